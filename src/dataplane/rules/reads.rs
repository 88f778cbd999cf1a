//! What a list of rules reads of a request beyond its method and path, which is what the
//! audit keeps of the requests it judges (`facts`). Found once, when the rules compile.

use crate::dataplane::names::secret_like;

/// A value a rule reads: a header, a query parameter, a body field (a JSON pointer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'r> {
    Header(&'r str),
    Query(&'r str),
    Body(&'r str),
}

/// The names the rules of a list read, sorted, each with whether the audit withholds it
/// whatever its value.
#[derive(Debug, Default)]
pub struct Reads {
    /// Header names, lower case.
    pub(crate) headers: Box<[Name]>,
    pub(crate) query: Box<[Name]>,
    /// JSON pointers, kept only where a proxy opts in.
    pub(crate) body: Box<[Name]>,
}

#[derive(Debug)]
pub struct Name {
    pub(crate) text: Box<str>,
    /// Named like a secret (for a pointer: any step of it, or the whole body).
    pub(crate) withheld: bool,
}

impl Reads {
    /// What the rules of a list read, each as often as any rule reads it.
    pub fn new<'r>(reads: impl Iterator<Item = Read<'r>>) -> Self {
        let (mut headers, mut query, mut body) = (Vec::new(), Vec::new(), Vec::new());
        for read in reads {
            match read {
                Read::Header(name) => headers.push(name.to_ascii_lowercase().into()),
                Read::Query(name) => query.push(name.into()),
                Read::Body(pointer) => body.push(pointer.into()),
            }
        }
        Self {
            headers: Name::sorted(headers, secret_like),
            query: Name::sorted(query, secret_like),
            body: Name::sorted(body, |pointer| {
                pointer.is_empty() || pointer.split('/').skip(1).any(secret_like)
            }),
        }
    }
}

impl Name {
    /// Each of `names` once, in order.
    fn sorted(mut names: Vec<Box<str>>, withheld: fn(&str) -> bool) -> Box<[Name]> {
        names.sort_unstable();
        names.dedup();
        (names.into_iter())
            .map(|text| Name {
                withheld: withheld(&text),
                text,
            })
            .collect()
    }
}
