//! A small element tree over quick-xml, for the libvirt documents
//! (`<domain>`, `<domainsnapshot>`) that are read leniently: vsnap takes
//! the parts it needs and leaves the rest of `virsh dumpxml` alone.

use crate::{EngineError, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// An element of a libvirt document: its name, attributes, children and text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name (any namespace prefix removed).
    pub name: String,
    /// Attributes (local names), in the document's order.
    pub attrs: Vec<(String, String)>,
    /// Child elements, in the document's order.
    pub children: Vec<Element>,
    /// The element's own text as read, all pieces joined (not trimmed).
    pub text: String,
}

impl Element {
    /// The attribute's value, if given.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The first child of that name.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
    /// Every child of that name, in order.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
    /// Refuse a second child of any of `names`: vsnap reads one of each
    /// (a second `<name>` or `<source>` would be silently ignored).
    pub fn only_one(&self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.children_named(n).nth(1).is_some() {
                return Err(EngineError::Xml(format!(
                    "<{}> has more than one <{n}>; give it once",
                    self.name
                )));
            }
        }
        Ok(())
    }
    /// Refuse an attribute not in `attrs` or a child element not in
    /// `children`: in a request, something vsnap does not act on must not
    /// be dropped in silence (`what` names the element for the message).
    pub fn only_known(&self, what: &str, attrs: &[&str], children: &[&str]) -> Result<()> {
        if let Some((k, _)) = self
            .attrs
            .iter()
            .find(|(k, _)| !attrs.contains(&k.as_str()))
        {
            return Err(EngineError::Xml(format!(
                "{what}: attribute {k}='...' is not something vsnap acts on; remove it{}",
                if attrs.is_empty() {
                    String::new()
                } else {
                    format!(" (known here: {})", attrs.join(", "))
                }
            )));
        }
        if let Some(c) = self
            .children
            .iter()
            .find(|c| !children.contains(&c.name.as_str()))
        {
            return Err(EngineError::Xml(format!(
                "{what}: element <{}> is not something vsnap acts on; remove it{}",
                c.name,
                if children.is_empty() {
                    String::new()
                } else {
                    format!(" (known here: {})", children.join(", "))
                }
            )));
        }
        Ok(())
    }
    /// Trimmed text of a child element (all of its text: pieces split by
    /// comments or CDATA sections are joined).
    pub fn child_text(&self, name: &str) -> Option<String> {
        self.child(name).map(|c| c.text.trim().to_string())
    }
}

fn local(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    match s.rsplit_once(':') {
        Some((_, l)) => l.to_string(),
        None => s.into_owned(),
    }
}

fn element(e: &BytesStart) -> Result<Element> {
    let mut el = Element {
        name: local(e.name().as_ref()),
        ..Default::default()
    };
    for a in e.attributes() {
        let a = a.map_err(|err| EngineError::Xml(format!("in <{}>: {err}", el.name)))?;
        let v = a
            .unescape_value()
            .map_err(|err| EngineError::Xml(format!("in <{}>: {err}", el.name)))?;
        el.attrs.push((local(a.key.as_ref()), v.into_owned()));
    }
    Ok(el)
}

/// Parse a whole document into its root element.
pub fn parse(text: &str) -> Result<Element> {
    crate::check_xml_size(text.len())?;
    let mut r = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let pos = r.buffer_position();
        match r
            .read_event()
            .map_err(|e| EngineError::Xml(format!("at byte {pos}: {e}")))?
        {
            Event::Start(e) => {
                if root.is_some() {
                    return Err(EngineError::Xml("content after the root element".into()));
                }
                stack.push(element(&e)?);
            }
            Event::Empty(e) => {
                if root.is_some() {
                    return Err(EngineError::Xml("content after the root element".into()));
                }
                let el = element(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| EngineError::Xml("unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(cur) = stack.last_mut() {
                    cur.text
                        .push_str(&t.unescape().map_err(|e| EngineError::Xml(e.to_string()))?);
                } else if !t
                    .unescape()
                    .map_err(|e| EngineError::Xml(e.to_string()))?
                    .trim()
                    .is_empty()
                {
                    return Err(EngineError::Xml("text outside the root element".into()));
                }
            }
            Event::CData(t) => {
                if let Some(cur) = stack.last_mut() {
                    cur.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if let Some(open) = stack.last() {
        return Err(EngineError::Xml(format!(
            "unclosed element <{}>",
            open.name
        )));
    }
    root.ok_or_else(|| EngineError::Xml("empty document".into()))
}

/// Write an element back as XML, `indent` spaces in, one child a line
/// (whitespace-only text is layout and left out; attribute and child order
/// are kept). What [`parse`] reads from this is the same element, up to
/// layout whitespace.
pub fn write(e: &Element, indent: usize) -> String {
    let mut x = String::new();
    write_into(&mut x, e, indent);
    x
}

fn write_into(x: &mut String, e: &Element, indent: usize) {
    let pad = " ".repeat(indent);
    x.push_str(&pad);
    x.push('<');
    x.push_str(&e.name);
    for (k, v) in &e.attrs {
        x.push_str(&format!(" {k}='{}'", esc(v)));
    }
    let text = e.text.trim();
    if e.children.is_empty() && text.is_empty() {
        x.push_str("/>\n");
        return;
    }
    x.push('>');
    x.push_str(&esc(text));
    if !e.children.is_empty() {
        x.push('\n');
        for c in &e.children {
            write_into(x, c, indent + 2);
        }
        x.push_str(&pad);
    }
    x.push_str(&format!("</{}>\n", e.name));
}

/// Escape text or an attribute value.
pub fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_tree_with_namespaces_removed() {
        let e = parse("<a x='1'><b>hi</b><v:c xmlns:v='u'>p</v:c><d/></a>").unwrap();
        assert_eq!(e.name, "a");
        assert_eq!(e.attr("x"), Some("1"));
        assert_eq!(e.child_text("b").as_deref(), Some("hi"));
        assert_eq!(e.child_text("c").as_deref(), Some("p"));
        assert!(e.child("d").is_some());
    }

    #[test]
    fn text_split_by_comments_or_cdata_is_joined() {
        let e = parse("<a><n>s<!-- x -->1</n><m>p<![CDATA[<q>]]>r</m></a>").unwrap();
        assert_eq!(e.child_text("n").as_deref(), Some("s1"));
        assert_eq!(e.child_text("m").as_deref(), Some("p<q>r"));
    }

    #[test]
    fn writes_back_what_it_read() {
        let src = "<disk type='network' device='disk'>\n  <source protocol='rbd' name='p/i&amp;j'>\n    <host name='m1' port='6789'/>\n  </source>\n  <serial>ab&lt;c</serial>\n</disk>";
        let e = parse(src).unwrap();
        let w = write(&e, 4);
        assert!(
            w.starts_with("    <disk type='network' device='disk'>\n"),
            "{w}"
        );
        assert!(w.contains("<serial>ab&lt;c</serial>"), "{w}");
        let again = parse(&w).unwrap();
        assert_eq!(write(&again, 4), w);
        assert_eq!(again.child("source").unwrap().attr("name"), Some("p/i&j"));
    }

    #[test]
    fn only_one_names_a_repeated_element() {
        let e = parse("<a><n>1</n><n>2</n><m/></a>").unwrap();
        assert!(e.only_one(&["m"]).is_ok());
        let err = e.only_one(&["m", "n"]).unwrap_err().to_string();
        assert!(err.contains("<a> has more than one <n>"), "{err}");
    }

    #[test]
    fn rejects_broken_documents() {
        for bad in ["", "<a>", "<a></b>", "<a/><b/>", "text"] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
