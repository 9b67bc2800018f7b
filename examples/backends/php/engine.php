<?php
/**
 * Example swarm PHP engine: a backend that honours the swarm backend contract.
 *
 *   php engine.php --symbol NAME --type TYPE --context CTX --params JSON
 *
 * - stdin carries the whole task document as JSON (run_id, task_id, attempt, ...), then EOF;
 * - the environment carries SWARM_RUN_ID, SWARM_TASK_ID, SWARM_SYMBOL, SWARM_ATTEMPT;
 * - print one JSON object on stdout; exit 0 for success, non-zero for failure;
 * - on failure, print {"ok": false, "error": ..., "retryable": false} to ask for no retry.
 *
 * Long-running symbols (see checkpoint() and the `steps` operation):
 * - a stdout line `::swarm::{"checkpoint": ..., "progress": 0.4, "message": "..."}` (any of
 *   the three keys) reports as it is printed; it is not part of the result;
 * - the task document's "checkpoint" is the last one saved by an earlier attempt (null if
 *   none), and SWARM_RESUMED=1 is set when it is not null: carry on from there.
 *
 * Operations (params.operation): init, cleanup, restore, steps; anything else echoes.
 * `steps` runs params.steps steps (default 10) of params.step_ms ms (default 100) each,
 * with a checkpoint after every step, and resumes after the last checkpointed step.
 * Drill parameters: "sleep_ms": N sleeps first; "fail": true fails (with "message" and
 * "retryable", default true).
 *
 * Copy this file and replace the bodies of the operations with real work.
 */

declare(strict_types=1);

const ENGINE_VERSION = '1.0.0';
const JSON_OUT = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE;

function usage_error(string $message): never
{
    fwrite(STDERR, "engine.php: $message\n");
    fwrite(STDERR, "usage: php engine.php --symbol NAME --type TYPE --context CTX --params JSON\n");
    exit(2);
}

/** @return array<string, string> the four flags, each given once */
function parse_args(array $argv): array
{
    $wanted = ['--symbol' => 'symbol', '--type' => 'type', '--context' => 'context', '--params' => 'params'];
    $args = [];
    $n = count($argv);
    for ($i = 1; $i < $n; $i += 2) {
        $flag = $argv[$i];
        if ($flag === '--version') {
            echo 'swarm php engine ' . ENGINE_VERSION . ' (PHP ' . PHP_VERSION . ")\n";
            exit(0);
        }
        if (!isset($wanted[$flag])) {
            usage_error("unknown argument '$flag'");
        }
        if ($i + 1 >= $n) {
            usage_error("$flag needs a value");
        }
        if (isset($args[$wanted[$flag]])) {
            usage_error("$flag given twice");
        }
        $args[$wanted[$flag]] = $argv[$i + 1];
    }
    foreach ($wanted as $flag => $key) {
        if (!isset($args[$key])) {
            usage_error("missing $flag");
        }
    }
    return $args;
}

/** A parameter's value, or $default when absent. Objects stay objects (stdClass). */
function param(object $params, string $name, mixed $default = null): mixed
{
    return property_exists($params, $name) ? $params->{$name} : $default;
}

function emit(array $result): void
{
    echo json_encode($result, JSON_OUT), "\n";
}

/**
 * Save a checkpoint (and say how far we are): the next attempt of this symbol, on any
 * worker, gets $data as the task document's "checkpoint". One line, flushed at once.
 */
function checkpoint(mixed $data, ?float $progress = null, string $message = ''): void
{
    $report = ['checkpoint' => $data];
    if ($progress !== null) {
        $report['progress'] = $progress;
    }
    if ($message !== '') {
        $report['message'] = $message;
    }
    echo '::swarm::', json_encode($report, JSON_OUT), "\n";
    fflush(STDOUT);
}

$args = parse_args($argv);

// Decode objects as stdClass so that {} stays {} (an assoc array would print as []).
$params = json_decode($args['params'], false);
if (!is_object($params)) {
    usage_error('--params must be a JSON object, got: ' . substr($args['params'], 0, 200));
}

// The task document; a terminal on stdin means someone runs us by hand: do not wait.
$document = null;
if (!stream_isatty(STDIN)) {
    $raw = stream_get_contents(STDIN);
    if ($raw !== false && trim($raw) !== '') {
        $document = json_decode($raw, false);
    }
}

$sleepMs = param($params, 'sleep_ms', 0);
if (is_int($sleepMs) || is_float($sleepMs)) {
    if ($sleepMs > 0) {
        usleep((int) ($sleepMs * 1000));
    }
}

if (param($params, 'fail', false) === true) {
    $message = (string) param($params, 'message', 'failed on purpose');
    fwrite(STDERR, "engine.php: $message\n");
    emit([
        'ok' => false,
        'error' => $message,
        'retryable' => (bool) param($params, 'retryable', true),
        'symbol' => $args['symbol'],
    ]);
    exit(1);
}

$operation = param($params, 'operation', 'echo');
$operation = is_string($operation) ? $operation : 'echo';
switch ($operation) {
    case 'init':
        $result = ['initialized' => true, 'context' => $args['context']];
        break;
    case 'cleanup':
        $result = ['cleaned_up' => true];
        break;
    case 'restore':
        $result = ['restored' => true];
        break;
    case 'steps':
        $steps = (int) param($params, 'steps', 10);
        $stepMs = (int) param($params, 'step_ms', 100);
        $resumed = is_object($document) ? param($document, 'checkpoint') : null;
        $start = is_object($resumed) ? (int) param($resumed, 'step', 0) : 0;
        $ran = [];
        for ($step = $start + 1; $step <= $steps; $step++) {
            usleep($stepMs * 1000); // the real work of one step goes here
            $ran[] = $step;
            checkpoint(['step' => $step], $step / max($steps, 1), "step $step of $steps");
        }
        $result = ['steps' => $steps, 'resumed_from' => $start, 'ran' => $ran,
                   'resumed' => getenv('SWARM_RESUMED') === '1'];
        break;
    default:
        $result = ['echoed' => true];
}

$env = [];
foreach (['SWARM_RUN_ID', 'SWARM_TASK_ID', 'SWARM_SYMBOL', 'SWARM_ATTEMPT'] as $name) {
    $value = getenv($name);
    $env[$name] = $value === false ? null : $value;
}

emit([
    'ok' => true,
    'engine' => 'php',
    'symbol' => $args['symbol'],
    'type' => $args['type'],
    'context' => $args['context'],
    'operation' => $operation,
    'params' => $params,
    'result' => $result,
    'env' => $env,
    'task_id' => is_object($document) ? param($document, 'task_id') : null,
    'attempt' => is_object($document) ? param($document, 'attempt') : null,
    'stdin_document' => $document,
    'pid' => getmypid(),
]);
exit(0);
