//! Reading manifests: files, directories and standard input; multi-document YAML and JSON; `kind:
//! List`. Every document keeps where it came from (file, 1-based index, first line), so every error
//! can name it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::store::MAX_OBJECT_BYTES;

/// The largest manifest file read at all (many documents of up to 1 MiB each).
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// One document of a manifest.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file as the user named it (`-` reads as `<stdin>`).
    pub source: String,
    /// 1-based position of the document in its file.
    pub index: usize,
    /// For items of a `kind: List`: the 1-based item number.
    pub item: Option<usize>,
    /// 1-based line the document starts on.
    pub line: usize,
    pub value: Value,
}

impl Document {
    /// `manifests/a.yaml: document 3` (+ ` item 2` inside a List), for messages.
    pub fn origin(&self) -> String {
        match self.item {
            Some(i) => format!("{}: document {} item {i}", self.source, self.index),
            None => format!("{}: document {}", self.source, self.index),
        }
    }

    /// The `kind:` field, if it is a string.
    pub fn kind(&self) -> Option<&str> {
        self.value.get("kind").and_then(Value::as_str)
    }

    /// `metadata.name`, if it is a string.
    pub fn name(&self) -> Option<&str> {
        self.value.pointer("/metadata/name").and_then(Value::as_str)
    }
}

/// An input problem: already worded for the user, without the `error: ` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `dir` is a state directory: the store's lock file beside its objects.
fn is_state_dir(dir: &Path) -> bool {
    dir.join("objects").is_dir() && dir.join(crate::store::STORE_LOCK_FILE).is_file()
}

/// Expands the `-f` arguments into (display name, path) pairs: files as given, directories to their
/// `*.yaml`, `*.yml` and `*.json` files in name order (recursing with `recursive`), `-` as stdin.
pub fn expand(files: &[String], recursive: bool) -> Result<Vec<Option<PathBuf>>, InputError> {
    let mut out = Vec::new();
    if files.iter().filter(|f| *f == "-").count() > 1 {
        // The second read would find it empty, and say nothing.
        return Err(InputError(
            "standard input (-f -) may be named only once".into(),
        ));
    }
    for f in files {
        if f == "-" {
            out.push(None);
            continue;
        }
        let p = PathBuf::from(f);
        let meta = fs::metadata(&p).map_err(|e| {
            InputError(if e.kind() == std::io::ErrorKind::NotFound {
                format!("the path {f:?} does not exist")
            } else {
                format!("{f}: {e}")
            })
        })?;
        if meta.is_dir() {
            walk(&p, recursive, &mut out)?;
        } else {
            out.push(Some(p));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, recursive: bool, out: &mut Vec<Option<PathBuf>>) -> Result<(), InputError> {
    let rd = fs::read_dir(dir).map_err(|e| InputError(format!("{}: {e}", dir.display())))?;
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        // A symlink to a directory is not descended into (as kubectl's -R does not): a link back
        // up the tree would repeat it until the path is too long. A symlink to a file is read.
        let is_dir = fs::metadata(&p).is_ok_and(|m| m.is_dir());
        if is_dir && fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            continue;
        }
        if is_dir {
            // `apply -R -f .` beside the default ./state: its object files are the store's, not
            // manifests (each would be refused as already defined).
            if recursive && !is_state_dir(&p) {
                walk(&p, recursive, out)?;
            }
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(Some(p));
        }
    }
    Ok(())
}

/// Reads one source (a path, or stdin for `None`) and returns its display name and text.
pub fn read_source(src: &Option<PathBuf>) -> Result<(String, String), InputError> {
    let (name, bytes) = match src {
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .take(MAX_FILE_BYTES + 1)
                .read_to_end(&mut buf)
                .map_err(|e| InputError(format!("<stdin>: {e}")))?;
            ("<stdin>".to_string(), buf)
        }
        Some(p) => {
            let name = p.display().to_string();
            let f = fs::File::open(p).map_err(|e| InputError(format!("{name}: {e}")))?;
            let mut buf = Vec::new();
            f.take(MAX_FILE_BYTES + 1)
                .read_to_end(&mut buf)
                .map_err(|e| InputError(format!("{name}: {e}")))?;
            (name, buf)
        }
    };
    if buf_too_big(&bytes) {
        return Err(InputError(format!(
            "{name}: the file is over the {MAX_FILE_BYTES}-byte limit"
        )));
    }
    let text =
        String::from_utf8(bytes).map_err(|e| InputError(format!("{name}: not UTF-8 text: {e}")))?;
    Ok((name, text))
}

fn buf_too_big(b: &[u8]) -> bool {
    b.len() as u64 > MAX_FILE_BYTES
}

/// [`read_all`] with every error as one `error: …` line, ready to print.
pub fn read_all_reported(
    files: &[String],
    recursive: bool,
    verb: &str,
) -> Result<Vec<Document>, super::CliError> {
    read_all(files, recursive, verb).map_err(|errs| {
        let lines: Vec<String> = errs.iter().map(|e| format!("error: {e}")).collect();
        super::CliError(lines.join("\n"))
    })
}

/// Reads every document of every source named by `-f`. As with kubectl, a file without objects
/// (empty, comments only) is skipped; input with no objects at all is an error, worded for `verb`
/// (`apply`, `delete`).
pub fn read_all(
    files: &[String],
    recursive: bool,
    verb: &str,
) -> Result<Vec<Document>, Vec<InputError>> {
    let sources = expand(files, recursive).map_err(|e| vec![e])?;
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for src in &sources {
        match read_source(src) {
            Ok((name, text)) => match parse(&name, &text) {
                Ok(d) => docs.extend(d),
                Err(e) => errors.extend(e),
            },
            Err(e) => errors.push(e),
        }
    }
    if sources.is_empty() {
        errors.push(InputError(format!(
            "{}: no objects passed to {verb} (no *.yaml, *.yml or *.json files)",
            files.join(", ")
        )));
    } else if docs.is_empty() && errors.is_empty() {
        errors.push(InputError(format!(
            "{}: no objects passed to {verb}",
            files.join(", ")
        )));
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

/// Parses the text of one file into its documents: JSON when it starts with `{` or `[` (a stream of
/// values), YAML otherwise (documents separated by `---` lines). Empty documents are skipped; `kind:
/// List` is expanded into its items.
pub fn parse(source: &str, text: &str) -> Result<Vec<Document>, Vec<InputError>> {
    let raw = if text.trim_start().starts_with(['{', '[']) {
        parse_json(source, text)?
    } else {
        parse_yaml(source, text)?
    };
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for d in raw {
        if d.kind() == Some("List") {
            match d.value.get("items") {
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        // An item that is no object is said so, not "kind: required".
                        let wrong = not_an_object(item)
                            .or_else(|| too_large(&serde_json::to_vec(item).unwrap_or_default()));
                        match wrong {
                            Some(m) => errors.push(InputError(format!(
                                "{}: document {} item {}: {m}",
                                source,
                                d.index,
                                i + 1
                            ))),
                            // Not `..d.clone()`: that copied the whole List for every item.
                            None => docs.push(Document {
                                source: d.source.clone(),
                                index: d.index,
                                item: Some(i + 1),
                                line: d.line,
                                value: item.clone(),
                            }),
                        }
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => errors.push(InputError(format!(
                    "{}: items: a List's items must be a sequence",
                    d.origin()
                ))),
            }
        } else {
            docs.push(d);
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

fn is_list(v: &Value) -> bool {
    v.get("kind").and_then(Value::as_str) == Some("List")
}

/// YAML 1.2 Core scalars, as the docs promise: only `true`/`false` are booleans (not `yes`, `on`,
/// `y`), and `0042` or `1_000` are strings, not numbers (`0042` would be read as 42.0).
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    }
}

fn too_large(bytes: &[u8]) -> Option<String> {
    (bytes.len() as u64 > MAX_OBJECT_BYTES).then(|| {
        format!(
            "the document is {} bytes; the limit is {MAX_OBJECT_BYTES} bytes",
            bytes.len()
        )
    })
}

fn parse_json(source: &str, text: &str) -> Result<Vec<Document>, Vec<InputError>> {
    let mut docs = Vec::new();
    let mut stream =
        serde_json::Deserializer::from_str(text).into_iter::<super::unique_json::UniqueKeys>();
    let mut index = 0;
    loop {
        let start = stream.byte_offset();
        let next = stream.next().map(|r| r.map(|u| u.0));
        let Some(next) = next else { break };
        index += 1;
        // The value starts at the first non-blank byte after the previous one.
        let skipped = text[start..].len() - text[start..].trim_start().len();
        let line = line_of(text, start + skipped);
        match next {
            Ok(v) => {
                let end = stream.byte_offset();
                // A List's limit is per item (see `parse`).
                if let Some(m) = too_large(&text.as_bytes()[start..end]).filter(|_| !is_list(&v)) {
                    return Err(vec![InputError(format!("{source}: document {index}: {m}"))]);
                }
                if let Some(e) = not_an_object(&v) {
                    return Err(vec![InputError(format!("{source}: document {index}: {e}"))]);
                }
                docs.push(Document {
                    source: source.to_string(),
                    index,
                    item: None,
                    line,
                    value: v,
                })
            }
            Err(e) => {
                return Err(vec![InputError(format!(
                    "{source}: document {index}: invalid JSON at line {}, column {}: {}",
                    e.line(),
                    e.column(),
                    strip_json_position(&e.to_string())
                ))])
            }
        }
    }
    Ok(docs)
}

fn strip_json_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn not_an_object(v: &Value) -> Option<String> {
    let what = match v {
        Value::Object(_) => return None,
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
    };
    Some(format!(
        "expected an object (a mapping with apiVersion, kind, metadata, spec), got {what}"
    ))
}

/// One YAML document's text and the line (1-based) it starts on.
struct Chunk {
    text: String,
    line: usize,
}

/// Splits a YAML stream on document markers at the start of a line (`---`, optionally followed by
/// content, and `...`), which YAML forbids inside a document's content.
fn split_yaml(text: &str) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut cur = Chunk {
        text: String::new(),
        line: 1,
    };
    let mut ended = false;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_start = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        let is_end = bare == "..." || bare.starts_with("... ") || bare.starts_with("...\t");
        if is_start {
            chunks.push(std::mem::replace(
                &mut cur,
                Chunk {
                    text: String::new(),
                    line: lineno,
                },
            ));
            ended = false;
            // Content after the marker stays on its line, at its column.
            cur.text.push_str("   ");
            cur.text.push_str(&line[3..]);
        } else if is_end {
            // The document ends here; a bare one may follow (YAML 1.2), after any directives.
            chunks.push(std::mem::replace(
                &mut cur,
                Chunk {
                    text: String::new(),
                    line: lineno + 1,
                },
            ));
            ended = true;
        } else if !ended || !line.trim_start().starts_with('%') {
            ended = false;
            if cur.text.is_empty() {
                cur.line = lineno;
            }
            cur.text.push_str(line);
        }
    }
    chunks.push(cur);
    chunks
}

fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t.starts_with('%')
    })
}

fn parse_yaml(source: &str, text: &str) -> Result<Vec<Document>, Vec<InputError>> {
    let mut docs = Vec::new();
    let mut index = 0;
    for chunk in split_yaml(text) {
        if is_blank_yaml(&chunk.text) {
            continue;
        }
        index += 1;
        let v: Value = match serde_saphyr::from_str_with_options(&chunk.text, yaml_options()) {
            Ok(v) => v,
            Err(e) => {
                return Err(vec![InputError(format!(
                    "{source}: document {index}: invalid YAML{}",
                    yaml_error(&e, chunk.line)
                ))])
            }
        };
        if v.is_null() {
            continue;
        }
        // A List's limit is per item (see `parse`).
        if let Some(m) = too_large(chunk.text.as_bytes()).filter(|_| !is_list(&v)) {
            return Err(vec![InputError(format!("{source}: document {index}: {m}"))]);
        }
        if let Some(e) = not_an_object(&v) {
            return Err(vec![InputError(format!("{source}: document {index}: {e}"))]);
        }
        docs.push(Document {
            source: source.to_string(),
            index,
            item: None,
            line: chunk.line,
            value: v,
        });
    }
    Ok(docs)
}

/// The YAML reader's messages that speak of its own options and types, said for a user.
fn in_our_words(msg: &str) -> String {
    if let Some(key) = msg.strip_prefix("duplicate mapping key: ") {
        let key = key.split(", set DuplicateKeyPolicy").next().unwrap_or(key);
        return format!("duplicate key {key:?}: a key may appear once in a mapping");
    }
    if let Some(what) = msg.strip_prefix("budget breached: ") {
        return if what.starts_with("Depth") {
            "nested too deeply (more than 64 levels)".into()
        } else {
            too_large_to_read(what)
        };
    }
    msg.to_string()
}

/// A breached budget (`Nodes { nodes: 250001 }`, `ScalarBytes { total_scalar_bytes: 67200083 }`)
/// in words: `too large to read: 250001 nodes, more than the reader takes`.
fn too_large_to_read(what: &str) -> String {
    let name = what.split([' ', '{']).next().unwrap_or_default();
    let mut words = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() && !words.is_empty() {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    let count: String = what
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    if words.is_empty() || count.is_empty() {
        return "too large to read".into();
    }
    format!("too large to read: {count} {words}, more than the reader takes")
}

/// ` at line L, column C: message`, with L counted from the start of the whole file.
fn yaml_error(e: &serde_saphyr::Error, first_line: usize) -> String {
    let plain = serde_saphyr::render_options! {
        snippets: serde_saphyr::SnippetMode::Off,
    };
    let mut msg = e.without_snippet().render_with_options(plain);
    let loc = e.location().filter(|l| l.line() > 0);
    if let Some(i) = msg.find(" at line ") {
        if loc.is_some() {
            msg.truncate(i);
        }
    }
    let msg = in_our_words(msg.trim());
    match loc {
        Some(l) => format!(
            " at line {}, column {}: {msg}",
            l.line() as usize + first_line - 1,
            l.column()
        ),
        None => format!(": {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_item_that_is_no_object_is_said_so() {
        let text = "kind: List\nitems:\n- 3\n- ~\n";
        let errs = parse("l.yaml", text).unwrap_err();
        let said: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].starts_with("l.yaml: document 1 item 1: expected an object"),
            "{said:?}"
        );
        assert!(said[0].ends_with("got a number"), "{said:?}");
        assert!(said[1].ends_with("got nothing"), "{said:?}");
    }

    #[test]
    fn a_breached_reader_budget_is_said_in_words() {
        assert_eq!(
            too_large_to_read("Nodes { nodes: 250001 }"),
            "too large to read: 250001 nodes, more than the reader takes"
        );
        assert_eq!(
            too_large_to_read("ScalarBytes { total_scalar_bytes: 67200083 }"),
            "too large to read: 67200083 scalar bytes, more than the reader takes"
        );
        assert_eq!(too_large_to_read("Odd"), "too large to read");
    }

    #[test]
    fn yaml_documents_keep_their_index_and_first_line() {
        let text = "# header\nkind: A\n---\nkind: B\n---\n# only a comment\n--- {kind: C}\n";
        let docs = parse("f.yaml", text).unwrap();
        let got: Vec<_> = docs
            .iter()
            .map(|d| (d.kind().unwrap().to_string(), d.index, d.line))
            .collect();
        assert_eq!(
            got,
            [("A".into(), 1, 1), ("B".into(), 2, 3), ("C".into(), 3, 7)]
        );
    }

    #[test]
    fn yaml_syntax_errors_are_placed_in_the_whole_file() {
        let text = "kind: A\n---\nkind: B\nmetadata:\n  name: [unclosed\n";
        let e = parse("f.yaml", text).unwrap_err();
        let msg = &e[0].0;
        assert!(
            msg.starts_with("f.yaml: document 2: invalid YAML at line "),
            "{msg}"
        );
        let line: usize = msg
            .split("at line ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!((5..=6).contains(&line), "{msg}");
    }

    #[test]
    fn json_streams_and_lists_expand() {
        let text = r#"{"kind":"List","items":[{"kind":"A"},{"kind":"B"}]}
{"kind":"C"}"#;
        let docs = parse("f.json", text).unwrap();
        let got: Vec<_> = docs.iter().map(|d| (d.origin(), d.line)).collect();
        assert_eq!(
            got,
            [
                ("f.json: document 1 item 1".to_string(), 1),
                ("f.json: document 1 item 2".to_string(), 1),
                ("f.json: document 2".to_string(), 2)
            ]
        );
        let e = parse("f.json", "{\"kind\": }").unwrap_err();
        assert!(e[0].0.contains("line 1, column"), "{:?}", e);
    }

    #[test]
    fn yaml_scalars_keep_their_types() {
        let docs = parse("f.yaml", "a: 0\nb: \"0\"\nc: -3\nd: true\ne: 1.5\n").unwrap();
        let v = &docs[0].value;
        assert_eq!(v["a"], 0);
        assert_eq!(v["b"], "0");
        assert_eq!(v["c"], -3);
        assert_eq!(v["d"], true);
        assert_eq!(v["e"], 1.5);
    }
}
