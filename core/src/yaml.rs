//! A YAML tree that keeps every node's position and every scalar's raw text.
//!
//! Built from `saphyr-parser` events rather than through serde so that (1) a loader can report
//! every problem of a file at once, each at its line and column, and (2) scalars stay text until
//! the schema says what they are: `on: yes` or `tag: 1.10` never turn into a boolean or a float
//! behind the user's back. Aliases are expanded under a node budget and a budget of expanded
//! scalar bytes, and depth and scalar size are bounded, so hostile input is refused quickly.

use std::borrow::Cow;
use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::diag::{Diagnostic, Lines, Pos};

/// Limits applied while building the tree.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    pub max_nodes: usize,
    pub max_scalar_bytes: usize,
    /// The bytes of scalar text in the document once every alias is expanded (keys included).
    pub max_expanded_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 20,
            max_depth: 64,
            max_nodes: 100_000,
            max_scalar_bytes: 256 << 10,
            max_expanded_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Quoted,
    /// A `|` or `>` block: its content starts on the line after the indicator.
    Block,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    Scalar { text: String, style: Style },
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

impl Node {
    /// A plain `~`, `null`, `Null`, `NULL` or an empty plain scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, style: Style::Plain }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            _ if self.is_null() => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn as_scalar(&self) -> Option<(&str, Style)> {
        match &self.value {
            Value::Scalar { text, style } => Some((text, *style)),
            _ => None,
        }
    }

    /// The position of byte `offset` of this scalar's text in the source, found by looking for
    /// `needle` (the text at that offset) on the source line it falls on. Falls back to the
    /// scalar's own position when the text was folded or escaped beyond recognition.
    pub fn pos_in_scalar(&self, source: &Lines<'_>, offset: usize, needle: &str) -> Pos {
        let Some((text, style)) = self.as_scalar() else {
            return self.pos;
        };
        let before = text.get(..offset).unwrap_or("");
        let newlines = before.matches('\n').count() as u32;
        // A block scalar's position is that of its first content line.
        let line = self.pos.line + newlines;
        if style != Style::Block && newlines == 0 {
            // A single-line scalar: the column follows from the start, plus an opening quote.
            let quote = u32::from(style == Style::Quoted);
            let candidate = Pos::new(line, self.pos.col + quote + before.chars().count() as u32);
            if source
                .from(candidate)
                .is_some_and(|s| s.starts_with(needle))
            {
                return candidate;
            }
        }
        let Some(src_line) = source.get(line) else {
            return self.pos;
        };
        match src_line.find(needle) {
            Some(byte) => Pos::new(line, src_line[..byte].chars().count() as u32 + 1),
            None => self.pos,
        }
    }
}

fn pos_of(span: &Span) -> Pos {
    let line = u32::try_from(span.start.line()).unwrap_or(u32::MAX);
    let col = u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX);
    Pos::new(line, col)
}

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Key, Node)>,
        /// The pending key, and whether its entry is kept (false for a duplicate or a bad key).
        key: Option<(Key, bool)>,
        /// Each key's first line, to find duplicates in constant time.
        seen: HashMap<String, u32>,
    },
}

/// An anchored node, with the size its copies add to the document.
struct Anchored {
    node: Node,
    nodes: usize,
    bytes: usize,
}

/// Parses one YAML document into a tree. An empty document gives an empty mapping. The first
/// syntax error or limit breach ends parsing; structural problems inside a well-formed document
/// (duplicate keys, non-scalar keys) are returned beside the tree.
pub fn parse(source: &str, limits: &Limits) -> Result<(Node, Vec<Diagnostic>), Vec<Diagnostic>> {
    if source.len() > limits.max_bytes {
        return Err(vec![Diagnostic::new(
            Pos::new(1, 1),
            format!(
                "file is {} bytes, more than the limit of {} bytes",
                source.len(),
                limits.max_bytes
            ),
        )]);
    }
    // The scanner takes a NUL for the end of the input, so a NUL inside a quoted scalar would
    // read as an unterminated string at the opening quote. YAML does not allow the character.
    if let Some(at) = source.find('\0') {
        return Err(vec![Diagnostic::new(
            pos_of_offset(source, at),
            "a NUL character (U+0000) is not allowed in a pipeline file",
        )]);
    }
    let mut diags = Vec::new();
    let mut anchors: Vec<Option<Anchored>> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut nodes = 0usize;
    // Scalar bytes of the document with aliases expanded: what the tree will hold.
    let mut bytes = 0usize;
    let mut documents = 0usize;

    let fatal = |pos: Pos, msg: String, mut diags: Vec<Diagnostic>| {
        diags.push(Diagnostic::new(pos, msg));
        Err(diags)
    };

    for item in Parser::new_from_str(source) {
        let (event, span) = match item {
            Ok(ok) => ok,
            Err(err) => {
                diags.push(syntax_error(source, &err));
                return Err(diags);
            }
        };
        let pos = pos_of(&span);
        let complete: Option<(Node, usize)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return fatal(
                        pos,
                        "a pipeline file holds one YAML document; found a second `---`".into(),
                        diags,
                    );
                }
                None
            }
            Event::Scalar(text, style, anchor, tag) => {
                if text.len() > limits.max_scalar_bytes {
                    return fatal(
                        pos,
                        format!(
                            "scalar of {} bytes is over the limit of {} bytes",
                            text.len(),
                            limits.max_scalar_bytes
                        ),
                        diags,
                    );
                }
                bytes += text.len();
                if bytes > limits.max_expanded_bytes {
                    return fatal(pos, expanded_budget_message(limits), diags);
                }
                if let Some(tag) = tag
                    && !tag_is_plain_str(&tag.handle, &tag.suffix)
                {
                    diags.push(Diagnostic::new(
                        pos,
                        format!("YAML tag `{}{}` is not supported", tag.handle, tag.suffix),
                    ));
                }
                let style = match style {
                    ScalarStyle::Plain => Style::Plain,
                    ScalarStyle::SingleQuoted | ScalarStyle::DoubleQuoted => Style::Quoted,
                    _ => Style::Block,
                };
                Some((
                    Node {
                        pos,
                        value: Value::Scalar {
                            text: Cow::into_owned(text),
                            style,
                        },
                    },
                    anchor,
                ))
            }
            Event::Alias(id) => match anchors.get(id).and_then(Option::as_ref) {
                Some(target) => {
                    // Budgets are checked before the copy is made.
                    nodes += target.nodes;
                    if nodes > limits.max_nodes {
                        return fatal(pos, alias_budget_message(limits), diags);
                    }
                    bytes += target.bytes;
                    if bytes > limits.max_expanded_bytes {
                        return fatal(pos, expanded_budget_message(limits), diags);
                    }
                    let mut copy = target.node.clone();
                    copy.pos = pos;
                    Some((copy, 0))
                }
                None => {
                    return fatal(
                        pos,
                        "alias refers to an anchor that is not defined before it".into(),
                        diags,
                    );
                }
            },
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= limits.max_depth {
                    return fatal(
                        pos,
                        format!("nesting deeper than {} levels", limits.max_depth),
                        diags,
                    );
                }
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                    }
                } else {
                    Frame::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                        seen: HashMap::new(),
                    }
                });
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => Some((
                    Node {
                        pos,
                        value: Value::Seq(items),
                    },
                    anchor,
                )),
                _ => return fatal(pos, "unbalanced sequence".into(), diags),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    ..
                }) => Some((
                    Node {
                        pos,
                        value: Value::Map(entries),
                    },
                    anchor,
                )),
                _ => return fatal(pos, "unbalanced mapping".into(), diags),
            },
        };
        let Some((node, anchor)) = complete else {
            continue;
        };
        nodes += 1;
        if nodes > limits.max_nodes {
            return fatal(node.pos, alias_budget_message(limits), diags);
        }
        if anchor > 0 {
            if anchors.len() <= anchor {
                anchors.resize_with(anchor + 1, || None);
            }
            anchors[anchor] = Some(Anchored {
                nodes: count_nodes(&node),
                bytes: count_bytes(&node),
                node: node.clone(),
            });
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries, key, seen, ..
            }) => match key.take() {
                None => {
                    let (name, keep) = match node.value {
                        Value::Scalar { text, .. } if text == "<<" => {
                            diags.push(
                                Diagnostic::new(
                                    node.pos,
                                    "YAML merge keys (`<<`) are not supported",
                                )
                                .with_len(2),
                            );
                            (text, false)
                        }
                        Value::Scalar { text, .. } => match seen.get(&text) {
                            Some(first_line) => {
                                diags.push(
                                    Diagnostic::new(node.pos, format!("duplicate key `{text}`"))
                                        .with_len(text.chars().count())
                                        .with_help(format!(
                                            "`{text}` is first set on line {first_line}"
                                        )),
                                );
                                (text, false)
                            }
                            None => {
                                seen.insert(text.clone(), node.pos.line);
                                (text, true)
                            }
                        },
                        _ => {
                            diags.push(Diagnostic::new(
                                node.pos,
                                "a mapping key must be a plain string",
                            ));
                            (String::new(), false)
                        }
                    };
                    *key = Some((
                        Key {
                            name,
                            pos: node.pos,
                        },
                        keep,
                    ));
                }
                // Keep the first of duplicate keys; the duplicate was reported above.
                Some((k, keep)) => {
                    if keep {
                        entries.push((k, node));
                    }
                }
            },
        }
    }
    let root = root.unwrap_or(Node {
        pos: Pos::new(1, 1),
        value: Value::Map(Vec::new()),
    });
    Ok((root, diags))
}

/// A scanner error as a diagnostic.
fn syntax_error(source: &str, err: &saphyr_parser::ScanError) -> Diagnostic {
    let m = err.marker();
    let pos = Pos::new(m.line() as u32, m.col() as u32 + 1);
    if err.info() == PLAIN_SCALAR_TAB
        && let Some(tab) = indentation_tab_after(source, pos.line)
    {
        // The scanner reports this at the start of the scalar it was reading, often lines
        // before the tab; point at the tab itself.
        return Diagnostic::new(tab, "a tab in indentation")
            .with_help("YAML indents with spaces only; replace the tab with spaces");
    }
    Diagnostic::new(pos, format!("YAML syntax error: {}", err.info()))
}

/// saphyr's message for a tab in the indentation of a line that continues a plain scalar.
const PLAIN_SCALAR_TAB: &str = "while scanning a plain scalar, found a tab";

/// The position of `offset` (a byte offset in `source`): 1-based line, column in characters.
fn pos_of_offset(source: &str, offset: usize) -> Pos {
    let before = &source[..offset.min(source.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let col = before[line_start..].chars().count() + 1;
    Pos::new(
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

/// The first tab in the indentation of a non-blank line after `line`: where a tab that the
/// scanner found while reading a plain scalar begun on `line` is.
fn indentation_tab_after(source: &str, line: u32) -> Option<Pos> {
    source
        .split('\n')
        .enumerate()
        .skip(line as usize)
        .find_map(|(i, text)| {
            let indent = text.len() - text.trim_start_matches([' ', '\t']).len();
            let lead = &text[..indent];
            let has_content = !text[indent..].trim_end_matches('\r').is_empty();
            let tab = lead.find('\t').filter(|_| has_content)?;
            Some(Pos::new(
                u32::try_from(i + 1).unwrap_or(u32::MAX),
                u32::try_from(tab + 1).unwrap_or(u32::MAX),
            ))
        })
}

fn tag_is_plain_str(handle: &str, suffix: &str) -> bool {
    suffix == "str" && (handle == "!!" || handle == "tag:yaml.org,2002:")
}

fn alias_budget_message(limits: &Limits) -> String {
    format!(
        "document expands to more than {} nodes (an alias bomb?)",
        limits.max_nodes
    )
}

fn expanded_budget_message(limits: &Limits) -> String {
    format!(
        "document expands to more than {} of text through aliases (an alias bomb?)",
        human_bytes(limits.max_expanded_bytes)
    )
}

fn human_bytes(n: usize) -> String {
    match n {
        _ if n >= 1 << 20 && n.is_multiple_of(1 << 20) => format!("{} MiB", n >> 20),
        _ if n >= 1 << 10 && n.is_multiple_of(1 << 10) => format!("{} KiB", n >> 10),
        _ => format!("{n} bytes"),
    }
}

/// The bytes of scalar text in a node, keys included.
fn count_bytes(node: &Node) -> usize {
    match &node.value {
        Value::Scalar { text, .. } => text.len(),
        Value::Seq(items) => items.iter().map(count_bytes).sum(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| k.name.len() + count_bytes(v))
            .sum(),
    }
}

fn count_nodes(node: &Node) -> usize {
    match &node.value {
        Value::Scalar { .. } => 1,
        Value::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Value::Map(entries) => {
            1 + entries
                .iter()
                .map(|(_, v)| 1 + count_nodes(v))
                .sum::<usize>()
        }
    }
}
