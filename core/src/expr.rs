//! `${{ ... }}` expressions: a small, safe language with no side effects.
//!
//! Literals (`'text'`, numbers, `true`, `false`, `null`), references (`params.who`,
//! `steps.build.outputs.digest`, `params['odd-name']`), `== != < <= > >=`, `&& || !`,
//! parentheses and a fixed set of functions. Nothing can run code or reach the system.

use std::fmt;

/// A value an expression produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
}

impl Value {
    pub fn truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => *n != 0.0 && !n.is_nan(),
            Value::String(s) => !s.is_empty(),
        }
    }

    fn as_number(&self) -> Option<f64> {
        match self {
            Value::Null => Some(0.0),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Number(n) => Some(*n),
            Value::String(s) if s.trim().is_empty() => Some(0.0),
            Value::String(s) => s.trim().parse().ok(),
        }
    }

    /// Loose equality in the way workflow users expect: strings compare case-insensitively,
    /// and a number and a numeric string compare as numbers.
    pub fn loose_eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            _ => match (self.as_number(), other.as_number()) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e15 => write!(f, "{}", *n as i64),
            Value::Number(n) => write!(f, "{n}"),
            Value::String(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Lit(Value),
    /// A dotted reference such as `steps.build.outputs.digest`; `start..end` is its byte span
    /// in the expression text.
    Ref {
        path: Vec<String>,
        start: usize,
        end: usize,
    },
    Not(Box<Expr>),
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    Call {
        name: String,
        args: Vec<Expr>,
        start: usize,
        end: usize,
    },
}

/// A problem in an expression: a byte span in its text and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    pub start: usize,
    pub len: usize,
    pub message: String,
    pub help: Option<String>,
}

impl ExprError {
    fn new(start: usize, len: usize, message: impl Into<String>) -> Self {
        ExprError {
            start,
            len: len.max(1),
            message: message.into(),
            help: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Dot,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Op(BinOp),
    Not,
    Eof,
}

const MAX_EXPR_LEN: usize = 4096;
const MAX_DEPTH: usize = 32;

fn lex(src: &str) -> Result<Vec<(Tok, usize, usize)>, ExprError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let tok = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'.' if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                Tok::Dot
            }
            b',' => {
                i += 1;
                Tok::Comma
            }
            b'(' => {
                i += 1;
                Tok::LParen
            }
            b')' => {
                i += 1;
                Tok::RParen
            }
            b'[' => {
                i += 1;
                Tok::LBracket
            }
            b']' => {
                i += 1;
                Tok::RBracket
            }
            b'\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match src[i..].find('\'') {
                        None => {
                            return Err(ExprError::new(
                                start,
                                src.len() - start,
                                "unterminated string literal",
                            ));
                        }
                        Some(k) => {
                            s.push_str(&src[i..i + k]);
                            i += k + 1;
                            if bytes.get(i) == Some(&b'\'') {
                                s.push('\'');
                                i += 1;
                            } else {
                                break;
                            }
                        }
                    }
                }
                Tok::Str(s)
            }
            b'"' => {
                return Err(ExprError {
                    help: Some("string literals use single quotes: 'text'".into()),
                    ..ExprError::new(
                        start,
                        1,
                        "double quotes do not make a string in an expression",
                    )
                });
            }
            b'=' | b'!' | b'<' | b'>' | b'&' | b'|' => {
                let next = bytes.get(i + 1).copied();
                let (tok, n) = match (c, next) {
                    (b'=', Some(b'=')) => (Tok::Op(BinOp::Eq), 2),
                    (b'!', Some(b'=')) => (Tok::Op(BinOp::Ne), 2),
                    (b'!', _) => (Tok::Not, 1),
                    (b'<', Some(b'=')) => (Tok::Op(BinOp::Le), 2),
                    (b'<', _) => (Tok::Op(BinOp::Lt), 1),
                    (b'>', Some(b'=')) => (Tok::Op(BinOp::Ge), 2),
                    (b'>', _) => (Tok::Op(BinOp::Gt), 1),
                    (b'&', Some(b'&')) => (Tok::Op(BinOp::And), 2),
                    (b'|', Some(b'|')) => (Tok::Op(BinOp::Or), 2),
                    (b'=', _) => {
                        return Err(ExprError {
                            help: Some("compare with `==`".into()),
                            ..ExprError::new(start, 1, "`=` is not an operator")
                        });
                    }
                    _ => {
                        let op = if c == b'&' { "&&" } else { "||" };
                        return Err(ExprError {
                            help: Some(format!("did you mean `{op}`?")),
                            ..ExprError::new(
                                start,
                                1,
                                format!("`{}` is not an operator", c as char),
                            )
                        });
                    }
                };
                i += n;
                tok
            }
            b'0'..=b'9' | b'-' | b'.' => {
                i += 1;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'.' | b'_'))
                {
                    i += 1;
                }
                let text = &src[start..i];
                let num = if let Some(hex) = text.strip_prefix("0x") {
                    i64::from_str_radix(hex, 16).ok().map(|n| n as f64)
                } else {
                    text.parse::<f64>().ok().filter(|n| n.is_finite())
                };
                match num {
                    Some(n) => Tok::Num(n),
                    None => {
                        return Err(ExprError::new(
                            start,
                            i - start,
                            format!("`{text}` is not a number"),
                        ));
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'-'))
                {
                    i += 1;
                }
                Tok::Ident(src[start..i].to_string())
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(ExprError::new(
                    start,
                    ch.len_utf8(),
                    format!("unexpected character `{ch}`"),
                ));
            }
        };
        out.push((tok, start, i));
    }
    out.push((Tok::Eof, src.len(), src.len()));
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<(Tok, usize, usize)>,
    at: usize,
    src: &'a str,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Tok {
        &self.toks[self.at.min(self.toks.len() - 1)].0
    }

    fn span(&self) -> (usize, usize) {
        let (_, s, e) = &self.toks[self.at.min(self.toks.len() - 1)];
        (*s, *e)
    }

    fn bump(&mut self) -> (Tok, usize, usize) {
        let t = self.toks[self.at.min(self.toks.len() - 1)].clone();
        self.at += 1;
        t
    }

    fn unexpected(&self, wanted: &str) -> ExprError {
        let (s, e) = self.span();
        if s >= self.src.len() {
            ExprError::new(
                s.saturating_sub(1),
                1,
                format!("expected {wanted}, found the end of the expression"),
            )
        } else {
            ExprError::new(
                s,
                e - s,
                format!("expected {wanted}, found `{}`", &self.src[s..e]),
            )
        }
    }

    fn binary(&mut self, level: usize) -> Result<Expr, ExprError> {
        // Precedence, loosest first: ||, &&, comparisons.
        const LEVELS: [&[BinOp]; 3] = [
            &[BinOp::Or],
            &[BinOp::And],
            &[
                BinOp::Eq,
                BinOp::Ne,
                BinOp::Lt,
                BinOp::Le,
                BinOp::Gt,
                BinOp::Ge,
            ],
        ];
        if level == LEVELS.len() {
            return self.unary();
        }
        let mut lhs = self.binary(level + 1)?;
        while let Tok::Op(op) = self.peek().clone() {
            if !LEVELS[level].contains(&op) {
                break;
            }
            self.bump();
            let rhs = self.binary(level + 1)?;
            lhs = Expr::Binary {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            };
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let (s, e) = self.span();
            return Err(ExprError::new(s, e - s, "expression nests too deeply"));
        }
        let result = if *self.peek() == Tok::Not {
            self.bump();
            self.unary().map(|e| Expr::Not(Box::new(e)))
        } else {
            self.primary()
        };
        self.depth -= 1;
        result
    }

    fn primary(&mut self) -> Result<Expr, ExprError> {
        let (tok, start, end) = self.bump();
        match tok {
            Tok::Str(s) => Ok(Expr::Lit(Value::String(s))),
            Tok::Num(n) => Ok(Expr::Lit(Value::Number(n))),
            Tok::LParen => {
                let inner = self.binary(0)?;
                if *self.peek() != Tok::RParen {
                    return Err(self.unexpected("`)`"));
                }
                self.bump();
                Ok(inner)
            }
            Tok::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                _ if *self.peek() == Tok::LParen => {
                    self.bump();
                    let mut args = Vec::new();
                    if *self.peek() != Tok::RParen {
                        loop {
                            args.push(self.binary(0)?);
                            match self.peek() {
                                Tok::Comma => {
                                    self.bump();
                                }
                                Tok::RParen => break,
                                _ => return Err(self.unexpected("`,` or `)`")),
                            }
                        }
                    }
                    let (_, _, close) = self.bump();
                    Ok(Expr::Call {
                        name,
                        args,
                        start,
                        end: close,
                    })
                }
                _ => {
                    let mut path = vec![name];
                    let mut last = end;
                    loop {
                        match self.peek() {
                            Tok::Dot => {
                                self.bump();
                                match self.bump() {
                                    (Tok::Ident(seg), _, e) => {
                                        path.push(seg);
                                        last = e;
                                    }
                                    _ => {
                                        self.at -= 1;
                                        return Err(self.unexpected("a name after `.`"));
                                    }
                                }
                            }
                            Tok::LBracket => {
                                self.bump();
                                match self.bump() {
                                    (Tok::Str(seg), _, _) => path.push(seg),
                                    _ => {
                                        self.at -= 1;
                                        return Err(self.unexpected("a quoted name inside `[ ]`"));
                                    }
                                }
                                if *self.peek() != Tok::RBracket {
                                    return Err(self.unexpected("`]`"));
                                }
                                last = self.bump().2;
                            }
                            _ => break,
                        }
                    }
                    Ok(Expr::Ref {
                        path,
                        start,
                        end: last,
                    })
                }
            },
            _ => {
                self.at -= 1;
                Err(self.unexpected("a value"))
            }
        }
    }
}

/// Parses the text between `${{` and `}}`.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    if src.len() > MAX_EXPR_LEN {
        return Err(ExprError::new(
            0,
            1,
            format!("expression longer than {MAX_EXPR_LEN} bytes"),
        ));
    }
    if src.trim().is_empty() {
        return Err(ExprError::new(0, src.len(), "empty expression"));
    }
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        at: 0,
        src,
        depth: 0,
    };
    let expr = p.binary(0)?;
    if *p.peek() != Tok::Eof {
        return Err(p.unexpected("an operator or the end of the expression"));
    }
    Ok(expr)
}

/// The functions expressions may call, with their argument counts (min, max).
pub const FUNCTIONS: &[(&str, usize, usize)] = &[
    ("contains", 2, 2),
    ("startsWith", 2, 2),
    ("endsWith", 2, 2),
    ("format", 1, 16),
    ("join", 1, 16),
    ("lower", 1, 1),
    ("upper", 1, 1),
    ("success", 0, 0),
    ("failure", 0, 0),
    ("always", 0, 0),
    ("cancelled", 0, 0),
];

/// Whether `name` is one of the status functions, which only a step's `if:` may call.
pub fn is_status_function(name: &str) -> bool {
    matches!(name, "success" | "failure" | "always" | "cancelled")
}

/// Whether the expression calls one of the status functions; a step `if:` without one is
/// implicitly `success() && (...)`.
pub fn uses_status_function(expr: &Expr) -> bool {
    match expr {
        Expr::Call { name, args, .. } => {
            is_status_function(name) || args.iter().any(uses_status_function)
        }
        Expr::Not(e) => uses_status_function(e),
        Expr::Binary { lhs, rhs, .. } => uses_status_function(lhs) || uses_status_function(rhs),
        _ => false,
    }
}

/// Visits every reference and call, for static checks.
pub fn walk<'e>(expr: &'e Expr, f: &mut dyn FnMut(&'e Expr)) {
    f(expr);
    match expr {
        Expr::Not(e) => walk(e, f),
        Expr::Binary { lhs, rhs, .. } => {
            walk(lhs, f);
            walk(rhs, f);
        }
        Expr::Call { args, .. } => args.iter().for_each(|a| walk(a, f)),
        Expr::Lit(_) | Expr::Ref { .. } => {}
    }
}

/// A failure while evaluating; the loader's static checks make these rare (a secret that is not
/// provided, an output a step did not write is not one: it evaluates to null).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// What an expression can see while it is evaluated.
pub trait Scope {
    /// The value at a reference path such as `["params", "who"]`.
    fn lookup(&self, path: &[String]) -> Result<Value, EvalError>;
    /// Whether any earlier step failed (for `success()` / `failure()`).
    fn failed(&self) -> bool;
    /// Whether the run was cancelled or timed out (for `cancelled()`).
    fn cancelled(&self) -> bool;
}

pub fn eval(expr: &Expr, scope: &dyn Scope) -> Result<Value, EvalError> {
    Ok(match expr {
        Expr::Lit(v) => v.clone(),
        Expr::Ref { path, .. } => scope.lookup(path)?,
        Expr::Not(e) => Value::Bool(!eval(e, scope)?.truthy()),
        Expr::Binary {
            op: BinOp::And,
            lhs,
            rhs,
        } => {
            let l = eval(lhs, scope)?;
            if l.truthy() { eval(rhs, scope)? } else { l }
        }
        Expr::Binary {
            op: BinOp::Or,
            lhs,
            rhs,
        } => {
            let l = eval(lhs, scope)?;
            if l.truthy() { l } else { eval(rhs, scope)? }
        }
        Expr::Binary { op, lhs, rhs } => {
            let (l, r) = (eval(lhs, scope)?, eval(rhs, scope)?);
            Value::Bool(match op {
                BinOp::Eq => l.loose_eq(&r),
                BinOp::Ne => !l.loose_eq(&r),
                _ => {
                    let ord = match (&l, &r) {
                        (Value::String(a), Value::String(b)) => {
                            Some(a.to_lowercase().cmp(&b.to_lowercase()))
                        }
                        _ => l
                            .as_number()
                            .zip(r.as_number())
                            .and_then(|(a, b)| a.partial_cmp(&b)),
                    };
                    match (op, ord) {
                        (_, None) => false,
                        (BinOp::Lt, Some(o)) => o.is_lt(),
                        (BinOp::Le, Some(o)) => o.is_le(),
                        (BinOp::Gt, Some(o)) => o.is_gt(),
                        (_, Some(o)) => o.is_ge(),
                    }
                }
            })
        }
        Expr::Call { name, args, .. } => {
            let vals = args
                .iter()
                .map(|a| eval(a, scope))
                .collect::<Result<Vec<_>, _>>()?;
            call(name, &vals, scope)?
        }
    })
}

fn call(name: &str, args: &[Value], scope: &dyn Scope) -> Result<Value, EvalError> {
    let s = |i: usize| args.get(i).map(ToString::to_string).unwrap_or_default();
    Ok(match name {
        "contains" => Value::Bool(s(0).to_lowercase().contains(&s(1).to_lowercase())),
        "startsWith" => Value::Bool(s(0).to_lowercase().starts_with(&s(1).to_lowercase())),
        "endsWith" => Value::Bool(s(0).to_lowercase().ends_with(&s(1).to_lowercase())),
        "lower" => Value::String(s(0).to_lowercase()),
        "upper" => Value::String(s(0).to_uppercase()),
        "join" => {
            // join(separator, a, b, ...)
            let parts: Vec<String> = args.iter().skip(1).map(ToString::to_string).collect();
            Value::String(parts.join(&s(0)))
        }
        "format" => Value::String(format_values(&s(0), &args[1.min(args.len())..])?),
        "success" => Value::Bool(!scope.failed() && !scope.cancelled()),
        "failure" => Value::Bool(scope.failed()),
        "always" => Value::Bool(true),
        "cancelled" => Value::Bool(scope.cancelled()),
        other => return Err(EvalError(format!("unknown function `{other}`"))),
    })
}

/// `format('{0} and {1}', a, b)`; `{{` and `}}` stand for literal braces.
fn format_values(fmt: &str, args: &[Value]) -> Result<String, EvalError> {
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut digits = String::new();
                for d in chars.by_ref() {
                    if d == '}' {
                        break;
                    }
                    digits.push(d);
                }
                let i: usize = digits.parse().map_err(|_| {
                    EvalError(format!("format: `{{{digits}}}` is not an argument index"))
                })?;
                let v = args
                    .get(i)
                    .ok_or_else(|| EvalError(format!("format: no argument {{{i}}}")))?;
                out.push_str(&v.to_string());
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// A string that may hold `${{ ... }}` expressions.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    /// An expression and the byte offset of its `${{` in the original string.
    Expr(Expr, usize),
}

/// A `${{ ... }}` found in a string: where it starts and ends (bytes, `${{` to `}}` inclusive)
/// and the byte offset of its inner text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found<'a> {
    pub start: usize,
    pub end: usize,
    pub inner: &'a str,
    pub inner_start: usize,
}

/// Finds every `${{ ... }}` in `s`. An opening without its closing `}}` is an error at the opening.
pub fn find_expressions(s: &str) -> Result<Vec<Found<'_>>, ExprError> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(k) = s[from..].find("${{") {
        let start = from + k;
        let inner_start = start + 3;
        let bytes = s.as_bytes();
        let mut i = inner_start;
        let mut in_str = false;
        let mut close = None;
        while i < bytes.len() {
            match bytes[i] {
                b'\'' => in_str = !in_str,
                b'}' if !in_str && bytes.get(i + 1) == Some(&b'}') => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        let Some(close) = close else {
            return Err(ExprError {
                help: Some("close it with `}}`".into()),
                ..ExprError::new(start, 3, "`${{` is never closed")
            });
        };
        found.push(Found {
            start,
            end: close + 2,
            inner: &s[inner_start..close],
            inner_start,
        });
        from = close + 2;
    }
    Ok(found)
}

impl Template {
    /// Parses a string into text and expressions. Errors carry byte offsets into `s`.
    pub fn parse(s: &str) -> Result<Template, Vec<ExprError>> {
        let found = find_expressions(s).map_err(|e| vec![e])?;
        let mut parts = Vec::new();
        let mut errors = Vec::new();
        let mut last = 0;
        for f in found {
            if f.start > last {
                parts.push(Part::Text(s[last..f.start].to_string()));
            }
            match parse(f.inner) {
                Ok(e) => parts.push(Part::Expr(e, f.start)),
                Err(mut e) => {
                    e.start += f.inner_start;
                    errors.push(e);
                }
            }
            last = f.end;
        }
        if last < s.len() {
            parts.push(Part::Text(s[last..].to_string()));
        }
        if errors.is_empty() {
            Ok(Template { parts })
        } else {
            Err(errors)
        }
    }

    pub fn literal(s: impl Into<String>) -> Template {
        Template {
            parts: vec![Part::Text(s.into())],
        }
    }

    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The expressions in this template with their offsets.
    pub fn exprs(&self) -> impl Iterator<Item = (&Expr, usize)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e, at) => Some((e, *at)),
            Part::Text(_) => None,
        })
    }

    /// Evaluates to a value: a template that is exactly one expression keeps its type; anything
    /// else is the concatenation of its parts as a string.
    pub fn eval(&self, scope: &dyn Scope) -> Result<Value, EvalError> {
        match self.parts.as_slice() {
            [Part::Expr(e, _)] => eval(e, scope),
            parts => {
                let mut out = String::new();
                for p in parts {
                    match p {
                        Part::Text(t) => out.push_str(t),
                        Part::Expr(e, _) => out.push_str(&eval(e, scope)?.to_string()),
                    }
                }
                Ok(Value::String(out))
            }
        }
    }

    pub fn eval_string(&self, scope: &dyn Scope) -> Result<String, EvalError> {
        self.eval(scope).map(|v| v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<String, Value>, bool);
    impl Scope for Map {
        fn lookup(&self, path: &[String]) -> Result<Value, EvalError> {
            Ok(self.0.get(&path.join(".")).cloned().unwrap_or(Value::Null))
        }
        fn failed(&self) -> bool {
            self.1
        }
        fn cancelled(&self) -> bool {
            false
        }
    }

    fn ev(src: &str) -> Value {
        let scope = Map(
            HashMap::from([
                ("params.who".into(), Value::String("World".into())),
                ("params.odd-name".into(), Value::String("x".into())),
                ("steps.a.outputs.n".into(), Value::String("3".into())),
            ]),
            false,
        );
        eval(&parse(src).expect("parses"), &scope).expect("evaluates")
    }

    #[test]
    fn evaluates() {
        assert_eq!(ev("params.who == 'world'"), Value::Bool(true));
        assert_eq!(ev("params['odd-name']"), Value::String("x".into()));
        assert_eq!(ev("params.odd-name == 'x' && !(1 > 2)"), Value::Bool(true));
        assert_eq!(ev("steps.a.outputs.n == 3"), Value::Bool(true));
        assert_eq!(ev("steps.a.outputs.n >= 4"), Value::Bool(false));
        assert_eq!(
            ev("format('{0}-{1}{{x}}', params.who, 2)"),
            Value::String("World-2{x}".into())
        );
        assert_eq!(ev("contains(params.who, 'OR')"), Value::Bool(true));
        assert_eq!(ev("startsWith('abc', 'ab') || false"), Value::Bool(true));
        assert_eq!(
            ev("params.missing || 'fallback'"),
            Value::String("fallback".into())
        );
        assert_eq!(ev("'it''s'"), Value::String("it's".into()));
        assert_eq!(ev("success() && !failure()"), Value::Bool(true));
        assert_eq!(ev("1.5 < 2"), Value::Bool(true));
    }

    #[test]
    fn reports_errors_with_spans() {
        let e = parse("params.who = 'x'").expect_err("an error");
        assert_eq!(
            (e.start, e.message.as_str()),
            (11, "`=` is not an operator")
        );
        let e = parse("(a || b").expect_err("an error");
        assert!(e.message.contains("expected `)`"), "{e:?}");
        let e = parse("a &&").expect_err("an error");
        assert!(e.message.contains("end of the expression"), "{e:?}");
        let e = parse("\"x\"").expect_err("an error");
        assert!(e.message.contains("double quotes"), "{e:?}");
        assert!(
            parse(&"!".repeat(100))
                .expect_err("an error")
                .message
                .contains("too deeply")
        );
    }

    #[test]
    fn templates() {
        let t = Template::parse("a-${{ params.who }}-${{ '}}' }}").expect("parses");
        assert_eq!(t.parts.len(), 4);
        let errs = Template::parse("x ${{ params. }}").expect_err("an error");
        assert_eq!(errs[0].start, 13);
        assert!(Template::parse("${{ open").is_err());
    }
}
