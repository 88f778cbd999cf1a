//! A request as the data plane sees it, whichever Envoy API brought it.

/// A request as the pipeline sees it. Header names are lower-case, as Envoy sends them.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The full `:path`: `/<proxy>/<upstream path>[?query]`.
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The request body as received, when it has been (empty for a request without one).
    pub body: Option<&'a [u8]>,
}
