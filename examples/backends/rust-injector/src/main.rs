//! wp-injector: the example Rust injector of the swarm backend contract.
//!
//!     wp-injector --symbol NAME --type TYPE --context CTX --params JSON
//!
//! - stdin carries the whole task document as JSON, then EOF;
//! - the environment carries SWARM_RUN_ID, SWARM_TASK_ID, SWARM_SYMBOL, SWARM_ATTEMPT;
//! - one JSON object goes to stdout; exit 0 is success, non-zero is failure;
//! - a failure that must not be retried prints `{"ok": false, "retryable": false, ...}`.
//!
//! Long-running symbols: a stdout line `::swarm::{"checkpoint": ..., "progress": 0.4,
//! "message": "..."}` (any of the three keys) is a report, taken as it is printed and left
//! out of the result (see `checkpoint`). The task document's `"checkpoint"` is the last one
//! an earlier attempt saved (null if none; `SWARM_RESUMED=1` then). The `"operation":
//! "steps"` drill runs `"steps"` steps (10) of `"step_ms"` ms (100), checkpointing each.
//!
//! Drill parameters: `"sleep_ms": N` sleeps first; `"fail": true` fails (with `"message"`
//! and `"retryable"`, default true). No dependencies, so the crate builds offline; the
//! small JSON reader below is enough for parameters and the task document.

use std::env;
use std::io::{self, IsTerminal, Read, Write};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const USAGE: &str = "usage: wp-injector --symbol NAME --type TYPE --context CTX --params JSON";
const ENV_KEYS: [&str; 5] =
    ["SWARM_RUN_ID", "SWARM_TASK_ID", "SWARM_SYMBOL", "SWARM_ATTEMPT", "SWARM_RESUMED"];

struct Args {
    symbol: String,
    kind: String,
    context: String,
    params: String,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let (mut symbol, mut kind, mut context, mut params) = (None, None, None, None);
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--symbol" => &mut symbol,
            "--type" => &mut kind,
            "--context" => &mut context,
            "--params" => &mut params,
            other => return Err(format!("unknown argument '{other}'")),
        };
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        if slot.replace(value.clone()).is_some() {
            return Err(format!("{flag} given twice"));
        }
    }
    Ok(Args {
        symbol: symbol.ok_or("missing --symbol")?,
        kind: kind.ok_or("missing --type")?,
        context: context.ok_or("missing --context")?,
        params: params.ok_or("missing --params")?,
    })
}

// Arrays are parsed (to validate parameters) but never looked into.
#[allow(dead_code)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A strict recursive-descent JSON reader (RFC 8259), nesting bounded to keep the stack safe.
struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn parse(text: &'a str) -> Result<Json, String> {
        let mut p = Parser { b: text.as_bytes(), i: 0, depth: 0 };
        let v = p.value()?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("trailing characters at byte {}", p.i));
        }
        Ok(v)
    }

    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.peek() {
            Some(b'{') => self.nested(Parser::object),
            Some(b'[') => self.nested(Parser::array),
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            Some(_) => self.err("unexpected character"),
            None => self.err("unexpected end"),
        }
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Json, String>) -> Result<Json, String> {
        self.depth += 1;
        if self.depth > 256 {
            return self.err("nesting too deep");
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err("invalid literal")
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let digits = |p: &mut Self| {
            let s = p.i;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.i += 1;
            }
            p.i - s
        };
        let int_start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.b[int_start] == b'0') {
            return self.err("invalid number");
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return self.err("invalid fraction");
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return self.err("invalid exponent");
            }
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|e| e.to_string())?;
        text.parse::<f64>().map(Json::Num).map_err(|e| e.to_string())
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.b.get(self.i..self.i + 4).ok_or("truncated \\u escape")?;
        let s = std::str::from_utf8(h).map_err(|e| e.to_string())?;
        let v = u32::from_str_radix(s, 16).map_err(|_| format!("bad \\u escape at {}", self.i))?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // the opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.peek().is_some_and(|c| c != b'"' && c != b'\\' && c >= 0x20) {
                self.i += 1;
            }
            // Input is a &str, and we stop only at ASCII bytes: the slice is valid UTF-8.
            out.push_str(std::str::from_utf8(&self.b[start..self.i]).map_err(|e| e.to_string())?);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or("unterminated escape")?;
                    self.i += 1;
                    match c {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let mut cp = self.hex4()?;
                            if (0xD800..0xDC00).contains(&cp)
                                && self.b[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                let low = self.hex4()?;
                                if (0xDC00..0xE000).contains(&low) {
                                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                                } else {
                                    out.push('\u{FFFD}');
                                    cp = low;
                                }
                            }
                            out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                        }
                        _ => return self.err("invalid escape"),
                    }
                }
                Some(_) => return self.err("control character in string"),
                None => return self.err("unterminated string"),
            }
        }
    }

    fn array(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Json::Arr(items));
        }
        loop {
            items.push(self.value()?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                _ => return self.err("expected ',' or ']'"),
            }
        }
    }

    fn object(&mut self) -> Result<Json, String> {
        self.i += 1;
        let mut members = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Json::Obj(members));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return self.err("expected a string key");
            }
            let key = self.string()?;
            self.ws();
            if self.peek() != Some(b':') {
                return self.err("expected ':'");
            }
            self.i += 1;
            members.push((key, self.value()?));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Json::Obj(members));
                }
                _ => return self.err("expected ',' or '}'"),
            }
        }
    }
}

/// `s` as a JSON string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quote_opt(s: Option<&str>) -> String {
    s.map_or_else(|| "null".to_string(), quote)
}

fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Prints one line; a closed stdout is not worth a panic.
fn emit(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Saves a checkpoint (with how far we are): the symbol's next attempt, on any worker,
/// gets `data` (JSON text) as the task document's `"checkpoint"`.
fn checkpoint(data: &str, progress: f64, message: &str) {
    emit(&format!(
        "::swarm::{{\"checkpoint\":{data},\"progress\":{},\"message\":{}}}",
        number(progress),
        quote(message)
    ));
}

/// The `steps` drill: resumes after the step of the checkpoint it was given, if any.
fn steps(params: &Json, document: Option<&Json>) -> String {
    let count = match params.get("steps") {
        Some(Json::Num(n)) if *n >= 0.0 => *n as u64,
        _ => 10,
    };
    let step_ms = match params.get("step_ms") {
        Some(Json::Num(n)) if *n >= 0.0 => *n as u64,
        _ => 100,
    };
    let start = match document.and_then(|d| d.get("checkpoint")).and_then(|c| c.get("step")) {
        Some(Json::Num(n)) => *n as u64,
        _ => 0,
    };
    let mut ran = Vec::new();
    for step in start + 1..=count {
        thread::sleep(Duration::from_millis(step_ms)); // the real work of one step
        ran.push(step.to_string());
        let message = format!("step {step} of {count}");
        checkpoint(&format!("{{\"step\":{step}}}"), step as f64 / count.max(1) as f64, &message);
    }
    format!("{{\"steps\":{count},\"resumed_from\":{start},\"ran\":[{}]}}", ran.join(","))
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("wp-injector: {message}\n{USAGE}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let argv: Vec<String> =
        env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    if argv.iter().any(|a| a == "--version") {
        println!("wp-injector {VERSION}");
        return ExitCode::SUCCESS;
    }
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => return usage_error(&e),
    };
    let params = match Parser::parse(&args.params) {
        Ok(v @ Json::Obj(_)) => v,
        Ok(_) => return usage_error("--params must be a JSON object"),
        Err(e) => return usage_error(&format!("--params is not JSON: {e}")),
    };

    // The task document. A terminal on stdin means someone runs us by hand: do not wait.
    let mut raw = Vec::new();
    if !io::stdin().is_terminal() {
        let _ = io::stdin().read_to_end(&mut raw);
    }
    let text = String::from_utf8_lossy(&raw);
    let document = Parser::parse(&text).ok();
    let task_id = match document.as_ref().and_then(|d| d.get("task_id")) {
        Some(Json::Str(s)) => Some(s.as_str()),
        _ => None,
    };
    let attempt = match document.as_ref().and_then(|d| d.get("attempt")) {
        Some(Json::Num(n)) => number(*n),
        _ => "null".to_string(),
    };

    if let Some(Json::Num(ms)) = params.get("sleep_ms") {
        if *ms > 0.0 {
            thread::sleep(Duration::from_secs_f64(ms / 1000.0));
        }
    }

    if let Some(Json::Bool(true)) = params.get("fail") {
        let message = match params.get("message") {
            Some(Json::Str(s)) => s.clone(),
            _ => "failed on purpose".to_string(),
        };
        let retryable = !matches!(params.get("retryable"), Some(Json::Bool(false)));
        eprintln!("wp-injector: {message}");
        emit(&format!(
            "{{\"ok\":false,\"error\":{},\"retryable\":{},\"symbol\":{}}}",
            quote(&message),
            retryable,
            quote(&args.symbol)
        ));
        return ExitCode::from(1);
    }

    let env_json: Vec<String> = ENV_KEYS
        .iter()
        .map(|k| {
            let v = env::var_os(k).map(|v| v.to_string_lossy().into_owned());
            format!("{}:{}", quote(k), quote_opt(v.as_deref()))
        })
        .collect();
    let operation = match params.get("operation") {
        Some(Json::Str(s)) => s.as_str(),
        _ => "inject",
    };
    let result = if operation == "steps" {
        steps(&params, document.as_ref())
    } else {
        "null".to_string()
    };
    emit(&format!(
        concat!(
            "{{\"ok\":true,\"engine\":\"wp-injector\",\"version\":{},\"symbol\":{},",
            "\"type\":{},\"context\":{},\"operation\":{},\"params\":{},\"env\":{{{}}},",
            "\"task_id\":{},\"attempt\":{},\"stdin_bytes\":{},\"pid\":{},\"result\":{}}}"
        ),
        quote(VERSION),
        quote(&args.symbol),
        quote(&args.kind),
        quote(&args.context),
        quote(operation),
        args.params.trim(), // validated above: echoed as the caller wrote it
        env_json.join(","),
        quote_opt(task_id),
        attempt,
        raw.len(),
        std::process::id(),
        result
    ));
    ExitCode::SUCCESS
}
