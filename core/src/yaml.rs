//! A YAML tree that keeps every node's position and every scalar's raw text.
//!
//! Built from `saphyr-parser` events rather than through serde so that (1) a loader can report
//! every problem of a file at once, each at its line and column, and (2) scalars stay text until
//! the schema says what they are: `on: yes` or `tag: 1.10` never turn into a boolean or a float
//! behind the user's back. Aliases are expanded under a node budget, and depth and scalar size are
//! bounded, so hostile input is refused quickly.

use std::borrow::Cow;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::diag::{Diagnostic, Pos};

/// Limits applied while building the tree.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    pub max_nodes: usize,
    pub max_scalar_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 20,
            max_depth: 64,
            max_nodes: 100_000,
            max_scalar_bytes: 256 << 10,
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
    pub fn pos_in_scalar(&self, source: &str, offset: usize, needle: &str) -> Pos {
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
            if source_at(source, candidate).is_some_and(|s| s.starts_with(needle)) {
                return candidate;
            }
        }
        let Some(src_line) = source.lines().nth(line.saturating_sub(1) as usize) else {
            return self.pos;
        };
        match src_line.find(needle) {
            Some(byte) => Pos::new(line, src_line[..byte].chars().count() as u32 + 1),
            None => self.pos,
        }
    }
}

fn source_at(source: &str, pos: Pos) -> Option<&str> {
    let line = source.lines().nth(pos.line.saturating_sub(1) as usize)?;
    let byte = line
        .char_indices()
        .nth(pos.col.saturating_sub(1) as usize)
        .map(|(b, _)| b)?;
    line.get(byte..)
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
        key: Option<Key>,
    },
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
    let mut diags = Vec::new();
    let mut anchors: Vec<Option<Node>> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut nodes = 0usize;
    let mut documents = 0usize;

    let fatal = |pos: Pos, msg: String, mut diags: Vec<Diagnostic>| {
        diags.push(Diagnostic::new(pos, msg));
        Err(diags)
    };

    for item in Parser::new_from_str(source) {
        let (event, span) = match item {
            Ok(ok) => ok,
            Err(err) => {
                let m = err.marker();
                let pos = Pos::new(m.line() as u32, m.col() as u32 + 1);
                return fatal(pos, format!("YAML syntax error: {}", err.info()), diags);
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
                    nodes += count_nodes(target);
                    if nodes > limits.max_nodes {
                        return fatal(pos, alias_budget_message(limits), diags);
                    }
                    let mut copy = target.clone();
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
                anchors.resize(anchor + 1, None);
            }
            anchors[anchor] = Some(node.clone());
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => match &node.value {
                    Value::Scalar { text, .. } => {
                        if text == "<<" {
                            diags.push(
                                Diagnostic::new(
                                    node.pos,
                                    "YAML merge keys (`<<`) are not supported",
                                )
                                .with_len(2),
                            );
                        } else if let Some((first, _)) =
                            entries.iter().find(|(k, _)| k.name == *text)
                        {
                            diags.push(
                                Diagnostic::new(node.pos, format!("duplicate key `{text}`"))
                                    .with_len(text.chars().count())
                                    .with_help(format!(
                                        "`{text}` is first set on line {}",
                                        first.pos.line
                                    )),
                            );
                        }
                        *key = Some(Key {
                            name: text.clone(),
                            pos: node.pos,
                        });
                    }
                    _ => {
                        diags.push(Diagnostic::new(
                            node.pos,
                            "a mapping key must be a plain string",
                        ));
                        *key = Some(Key {
                            name: String::new(),
                            pos: node.pos,
                        });
                    }
                },
                Some(k) => {
                    // Keep the first of duplicate keys; the duplicate was reported above.
                    if !k.name.is_empty()
                        && k.name != "<<"
                        && !entries.iter().any(|(e, _)| e.name == k.name)
                    {
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

fn tag_is_plain_str(handle: &str, suffix: &str) -> bool {
    suffix == "str" && (handle == "!!" || handle == "tag:yaml.org,2002:")
}

fn alias_budget_message(limits: &Limits) -> String {
    format!(
        "document expands to more than {} nodes (an alias bomb?)",
        limits.max_nodes
    )
}

fn count_nodes(node: &Node) -> usize {
    match &node.value {
        Value::Scalar { .. } => 1,
        Value::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Value::Map(entries) => 1 + entries.iter().map(|(_, v)| count_nodes(v)).sum::<usize>(),
    }
}
