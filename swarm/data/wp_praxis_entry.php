<?php
/**
 * swarm's entry into the original WP Praxis PHP engine (engine/php/symbolic-engine.php),
 * a class library that reads no argv and no stdin. Shipped with swarm; a worker runs it
 * for [backends.php_engine] adapter = "wp_praxis":
 *
 *   php wp_praxis_entry.php --engine SYMBOLIC_ENGINE_PHP --wp-load WP_LOAD_PHP  < task.json
 *   php wp_praxis_entry.php --check --engine SYMBOLIC_ENGINE_PHP --wp-load WP_LOAD_PHP
 *
 * stdin carries swarm's task document (symbol, type, context, parameters, ...). The script
 * loads WordPress, then the engine's classes (Composer's autoloader if there is one),
 * maps swarm's vocabulary to the engine's, runs the symbol through SymbolicEngine and
 * prints one JSON object. Exit 0 only if the symbol's state is "completed"; 1 on any
 * Throwable, a failed state, or an exit before answering; 2 on a usage error.
 * `--check` loads only the engine's classes (not WordPress) and reports its version.
 */

declare(strict_types=1);

const SWARM_JSON = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_INVALID_UTF8_SUBSTITUTE
    | JSON_PARTIAL_OUTPUT_ON_ERROR;
// swarm -> engine. The engine knows action, filter, state, hook, custom: a query or a
// transform asks for a value, which in WordPress is a filter (apply_filters).
const SWARM_TYPES = ['action' => 'action', 'filter' => 'filter', 'state' => 'state',
    'query' => 'filter', 'transform' => 'filter'];
// The engine's other contexts (rest, ajax, cron) name web requests; a worker is the CLI.
const SWARM_CONTEXTS = ['wordpress' => 'wordpress', 'filesystem' => 'cli', 'database' => 'cli',
    'network' => 'cli', 'generic' => 'cli'];
const SWARM_ENGINE_CLASSES = ['WPPraxis\\Engine\\SymbolicEngine', 'WPPraxis\\Engine\\Symbol'];

$GLOBALS['swarm_answered'] = false;

/** Print the answer (with whatever WordPress or the engine printed meanwhile) and exit. */
function swarm_answer(array $reply, int $code): never
{
    $GLOBALS['swarm_answered'] = true;
    $stray = '';
    while (ob_get_level() > 0) {
        $stray = ob_get_clean() . $stray;
    }
    if ($stray !== '') {
        $reply['printed'] = $stray;
    }
    fwrite(STDOUT, json_encode($reply, SWARM_JSON) . "\n");
    exit($code);
}

function swarm_fail(string $error, bool $retryable, array $extra = []): never
{
    swarm_answer(['ok' => false, 'error' => $error, 'retryable' => $retryable] + $extra, 1);
}

function swarm_usage(string $message): never
{
    $GLOBALS['swarm_answered'] = true;  // a usage error is answered on stderr, with exit 2
    fwrite(STDERR, "error: $message\n");
    fwrite(STDERR, "usage: php wp_praxis_entry.php [--check] --engine FILE --wp-load FILE\n");
    exit(2);
}

/** @return array{check: bool, engine: string, wp_load: string} */
function swarm_args(array $argv): array
{
    $args = ['check' => false, 'engine' => null, 'wp_load' => null];
    $flags = ['--engine' => 'engine', '--wp-load' => 'wp_load'];
    for ($i = 1, $n = count($argv); $i < $n; $i++) {
        $arg = $argv[$i];
        if ($arg === '--check') {
            $args['check'] = true;
        } elseif (isset($flags[$arg]) && $i + 1 < $n) {
            $args[$flags[$arg]] = $argv[++$i];
        } else {
            swarm_usage("unexpected argument '$arg'");
        }
    }
    foreach ($flags as $flag => $key) {
        if ($args[$key] === null || $args[$key] === '') {
            swarm_usage("missing $flag");
        }
    }
    return $args;
}

function swarm_load_engine(string $engine): void
{
    if (!is_file($engine)) {
        swarm_fail("engine script $engine not found", false);
    }
    $dir = dirname((string) realpath($engine));
    // The engine is installed with Composer (namespace WPPraxis\Engine): use its autoloader.
    for ($d = $dir, $i = 0; $i < 4; $i++, $d = dirname($d)) {
        if (is_file("$d/vendor/autoload.php")) {
            require_once "$d/vendor/autoload.php";
            break;
        }
    }
    require_once $engine;
    if (!class_exists(SWARM_ENGINE_CLASSES[1]) && is_file("$dir/Symbol.php")) {
        require_once "$dir/Symbol.php";
    }
    foreach (SWARM_ENGINE_CLASSES as $class) {
        if (!class_exists($class)) {
            swarm_fail("$engine defines no class $class: not the WP Praxis engine", false);
        }
    }
}

/** @return array<string, mixed> the task document from stdin */
function swarm_task(): array
{
    $doc = json_decode((string) stream_get_contents(STDIN), true);
    if (!is_array($doc) || !is_string($doc['symbol'] ?? null) || !is_string($doc['type'] ?? null)
        || !is_string($doc['context'] ?? null) || !is_array($doc['parameters'] ?? null)) {
        swarm_fail('stdin is not a swarm task document', false);
    }
    return $doc;
}

register_shutdown_function(static function (): void {
    if ($GLOBALS['swarm_answered']) {
        return;
    }
    // A fatal error, or WordPress calling exit (wp_die and friends) before we answered.
    $last = error_get_last();
    $why = $last !== null && in_array($last['type'], [E_ERROR, E_PARSE, E_CORE_ERROR, E_COMPILE_ERROR], true)
        ? "PHP fatal error: {$last['message']} in {$last['file']}:{$last['line']}"
        : 'WordPress or the engine exited before the symbol was answered';
    swarm_fail($why, true);
});

ob_start();  // stdout is ours: anything WordPress or the engine prints is kept apart
$swarm_args = swarm_args($argv);
try {
    if ($swarm_args['check']) {
        swarm_load_engine($swarm_args['engine']);
        if (!is_readable($swarm_args['wp_load'])) {
            swarm_fail("wp_load {$swarm_args['wp_load']} is not readable", false);
        }
        swarm_answer(['ok' => true, 'engine_version' => constant(SWARM_ENGINE_CLASSES[0] . '::VERSION'),
            'php' => PHP_VERSION], 0);
    }
    $swarm_task = swarm_task();
    // WordPress is loaded at file scope: wp-config.php defines globals ($table_prefix, ...)
    // that a function scope would swallow.
    $_SERVER['HTTP_HOST'] ??= 'localhost';
    $_SERVER['REQUEST_URI'] ??= '/';
    require_once $swarm_args['wp_load'];
    swarm_load_engine($swarm_args['engine']);

    $swarm_params = $swarm_task['parameters'];
    $swarm_type = SWARM_TYPES[$swarm_task['type']] ?? null;
    $swarm_context = SWARM_CONTEXTS[$swarm_task['context']] ?? null;
    if ($swarm_type === null || $swarm_context === null) {
        swarm_fail("no engine vocabulary for type {$swarm_task['type']}, context {$swarm_task['context']}", false);
    }
    // The engine's own dispatchers rust_injector and powershell would shell out with paths
    // hard-coded in the engine: swarm dispatches those backends itself.
    $swarm_dispatch = isset($swarm_params['callback']) ? 'php' : 'wordpress';
    $swarm_args_list = is_array($swarm_params['args'] ?? null) ? array_values($swarm_params['args']) : [];
    try {
        $swarm_symbol = new WPPraxis\Engine\Symbol(['name' => $swarm_task['symbol'],
            'type' => $swarm_type, 'context' => $swarm_context, 'dispatch' => $swarm_dispatch,
            'parameters' => $swarm_params]);
    } catch (InvalidArgumentException $e) {
        swarm_fail('the engine refuses the symbol: ' . $e->getMessage(), false);
    }
    $swarm_engine = new WPPraxis\Engine\SymbolicEngine(['auto_register' => false]);
    $swarm_engine->register_symbol($swarm_symbol);
    $swarm_result = $swarm_engine->execute_symbol($swarm_task['symbol'], ...$swarm_args_list);
    $swarm_state = $swarm_symbol->get_state();
    $swarm_reply = ['symbol' => $swarm_task['symbol'], 'engine_type' => $swarm_type,
        'engine_context' => $swarm_context, 'dispatch' => $swarm_dispatch,
        'status' => $swarm_state['status'] ?? null];
    if (($swarm_state['status'] ?? null) !== 'completed') {
        // Symbol::execute() catches the engine's exceptions and returns null: its state says.
        $errors = $swarm_state['errors'] ?? [];
        $why = is_array($errors) && $errors ? (string) end($errors) : 'state ' . json_encode($swarm_state['status'] ?? null);
        swarm_fail("symbol failed in the engine: $why", true, $swarm_reply);
    }
    swarm_answer(['ok' => true] + $swarm_reply + ['result' => $swarm_result], 0);
} catch (Throwable $e) {
    swarm_fail(get_class($e) . ': ' . $e->getMessage(), true,
        ['at' => $e->getFile() . ':' . $e->getLine()]);
}
