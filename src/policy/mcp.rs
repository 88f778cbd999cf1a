//! MCP servers as targets: a proxy that speaks MCP's streamable HTTP transport
//! (`protocol: mcp`), its per-tool limits and prices, and the rules' `mcp` condition on a
//! message's JSON-RPC method and tool.

use serde::{Deserialize, Serialize};

/// What a proxy's traffic is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any HTTP API.
    #[default]
    Http,
    /// MCP over streamable HTTP: every POST is read as one JSON-RPC message.
    Mcp,
}

impl Protocol {
    pub fn is_http(&self) -> bool {
        *self == Protocol::Http
    }
}

/// An MCP proxy's settings beyond the credential it injects.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct McpSpec {
    /// Per-tool limits and prices; a tool takes the first entry whose name matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// A tool name, or a glob of them (`search_*`).
    pub name: String,
    /// Calls of the tool each proxy credential may make per minute (all its keys, run
    /// keys and workloads together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Calls per day, each proxy credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_day: Option<u32>,
    /// What one call costs, charged to the caller's spend caps like any price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_usd: Option<f64>,
}

/// A rule's condition on an MCP message: its JSON-RPC method and, for `tools/call`, the
/// tool it calls (globs). `tools` alone means `methods: [tools/call]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct McpCondition {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
}

impl McpCondition {
    /// The methods the condition matches, `tools/call` when only tools are named.
    pub fn methods(&self) -> Vec<&str> {
        if self.methods.is_empty() && !self.tools.is_empty() {
            vec!["tools/call"]
        } else {
            self.methods.iter().map(String::as_str).collect()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.methods.is_empty() && self.tools.is_empty() {
            return Err("mcp: name `methods`, `tools` or both".into());
        }
        if !self.tools.is_empty() && self.methods().iter().any(|m| *m != "tools/call") {
            return Err(
                "mcp: `tools` judge `tools/call` only; give them a rule of their own".into(),
            );
        }
        for glob in self.methods.iter().chain(&self.tools) {
            if glob.is_empty() || glob.len() > 256 {
                return Err(format!("mcp: {glob:?}: 1 to 256 characters"));
            }
        }
        Ok(())
    }
}

impl McpSpec {
    pub(crate) fn validate(&self) -> Result<(), String> {
        for t in &self.tools {
            let item = format!("mcp.tools {:?}", t.name);
            if t.name.is_empty() || t.name.len() > 256 {
                return Err(format!("{item}: a name of 1 to 256 characters"));
            }
            if t.requests_per_minute == Some(0) || t.requests_per_day == Some(0) {
                return Err(format!("{item}: a limit is at least 1"));
            }
            if t.price_usd.is_some_and(|p| !(p.is_finite() && p >= 0.0)) {
                return Err(format!("{item}: price_usd is a non-negative amount"));
            }
            if (t.requests_per_minute, t.requests_per_day, t.price_usd) == (None, None, None) {
                return Err(format!("{item}: give a limit or a price"));
            }
        }
        Ok(())
    }
}
