#Requires -Version 7.0
<#
.SYNOPSIS
    Example swarm PowerShell engine: a backend that honours the swarm backend contract.

.DESCRIPTION
    pwsh -NoProfile -NonInteractive -File engine.ps1 -SymbolName NAME -SymbolType TYPE `
         -Context CTX -Parameters JSON

    - stdin carries the whole task document as JSON (run_id, task_id, attempt, ...), then EOF;
    - the environment carries SWARM_RUN_ID, SWARM_TASK_ID, SWARM_SYMBOL, SWARM_ATTEMPT;
    - one compressed JSON object goes to stdout; exit 0 is success, non-zero is failure;
    - a failure that must not be retried prints {"ok": false, "retryable": false, ...}.

    Long-running symbols: a stdout line ::swarm::{"checkpoint": ..., "progress": 0.4,
    "message": "..."} (any of the three keys) is a report, taken as it is printed and left
    out of the result (see Save-Checkpoint). The task document's "checkpoint" is the last
    one an earlier attempt saved ($null if none; SWARM_RESUMED=1 then): carry on from there.

    Operations (Parameters.operation): init, cleanup, restore, steps; anything else echoes.
    steps runs Parameters.steps steps (10) of step_ms ms (100), checkpointing each one.
    Drill parameters: "sleep_ms": N sleeps first; "fail": true fails (with "message" and
    "retryable", default true). Copy this file and replace the operations with real work.
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][string]$SymbolName,
    [Parameter(Mandatory = $true)][string]$SymbolType,
    [Parameter(Mandatory = $true)][string]$Context,
    [Parameter(Mandatory = $true)][string]$Parameters
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

# A parameter's value, or $Default when the object has no such property.
function Get-Param {
    param($Object, [string]$Name, $Default = $null)
    if ($Object -is [System.Management.Automation.PSCustomObject] -and
        $Object.PSObject.Properties.Name -contains $Name) {
        return $Object.$Name
    }
    return $Default
}

function Write-Result {
    param([System.Collections.IDictionary]$Result)
    # Depth: the default (2) would flatten nested parameters into strings.
    [Console]::Out.WriteLine(($Result | ConvertTo-Json -Compress -Depth 64))
}

# Saves a checkpoint (and how far we are): the symbol's next attempt, on any worker, gets
# $Data as the task document's "checkpoint". One line, written and flushed at once.
function Save-Checkpoint {
    param($Data, [double]$Progress, [string]$Message = '')
    $report = [ordered]@{ checkpoint = $Data; progress = $Progress; message = $Message }
    [Console]::Out.WriteLine('::swarm::' + ($report | ConvertTo-Json -Compress -Depth 64))
    [Console]::Out.Flush()
}

try {
    $params = $Parameters | ConvertFrom-Json
} catch {
    [Console]::Error.WriteLine("engine.ps1: -Parameters is not JSON: $($_.Exception.Message)")
    exit 2
}
# [pscustomobject] would also match any wrapped value: test for the real type.
if ($params -isnot [System.Management.Automation.PSCustomObject]) {
    [Console]::Error.WriteLine('engine.ps1: -Parameters must be a JSON object')
    exit 2
}

# The task document. An interactive console means someone runs us by hand: do not wait.
$document = $null
if ([Console]::IsInputRedirected) {
    $raw = [Console]::In.ReadToEnd()
    if ($raw.Trim()) {
        try { $document = $raw | ConvertFrom-Json } catch { $document = $null }
    }
}

$sleepMs = Get-Param $params 'sleep_ms' 0
$isNumber = $sleepMs -is [long] -or $sleepMs -is [int] -or $sleepMs -is [double] -or
    $sleepMs -is [decimal]
if ($isNumber -and $sleepMs -gt 0) {
    Start-Sleep -Milliseconds ([int]$sleepMs)
}

if ((Get-Param $params 'fail' $false) -eq $true) {
    $message = [string](Get-Param $params 'message' 'failed on purpose')
    [Console]::Error.WriteLine("engine.ps1: $message")
    Write-Result ([ordered]@{
        ok        = $false
        error     = $message
        retryable = [bool](Get-Param $params 'retryable' $true)
        symbol    = $SymbolName
    })
    exit 1
}

$operation = Get-Param $params 'operation' 'echo'
if ($operation -isnot [string]) { $operation = 'echo' }
$result = switch ($operation) {
    'init'    { [ordered]@{ initialized = $true; context = $Context } }
    'cleanup' { [ordered]@{ cleaned_up = $true } }
    'restore' { [ordered]@{ restored = $true } }
    'steps'   {
        $steps = [int](Get-Param $params 'steps' 10)
        $stepMs = [int](Get-Param $params 'step_ms' 100)
        $resumed = Get-Param $document 'checkpoint'
        $start = [int](Get-Param $resumed 'step' 0)
        $ran = @()
        for ($step = $start + 1; $step -le $steps; $step++) {
            Start-Sleep -Milliseconds $stepMs  # the real work of one step goes here
            $ran += $step
            Save-Checkpoint ([ordered]@{ step = $step }) ($step / [Math]::Max($steps, 1)) `
                "step $step of $steps"
        }
        [ordered]@{ steps = $steps; resumed_from = $start; ran = $ran }
    }
    default   { [ordered]@{ echoed = $true } }
}

$envSeen = [ordered]@{}
foreach ($name in 'SWARM_RUN_ID', 'SWARM_TASK_ID', 'SWARM_SYMBOL', 'SWARM_ATTEMPT',
                 'SWARM_RESUMED') {
    $envSeen[$name] = [Environment]::GetEnvironmentVariable($name)
}

Write-Result ([ordered]@{
    ok             = $true
    engine         = 'powershell'
    symbol         = $SymbolName
    type           = $SymbolType
    context        = $Context
    operation      = $operation
    params         = $params
    result         = $result
    env            = $envSeen
    task_id        = Get-Param $document 'task_id'
    attempt        = Get-Param $document 'attempt'
    stdin_document = $document
    pid            = $PID
})
exit 0
