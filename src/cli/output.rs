//! How a command prints: `-o table` for people (the default), `-o json` or `-o yaml` for
//! programs, the same document in either. `--json` stays, as `-o json`.

use clap::{Args, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub(super) enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, Args)]
pub(super) struct Output {
    /// How to print: `table` for people, `json` or `yaml` for programs.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The same as `-o json`.
    #[arg(long)]
    json: bool,
}

impl Output {
    pub(super) fn format(&self) -> Format {
        if self.json { Format::Json } else { self.format }
    }

    /// Whether the caller prints for people.
    pub(super) fn table(&self) -> bool {
        self.format() == Format::Table
    }

    /// Prints `doc` as JSON or YAML (a table is the caller's to print).
    pub(super) fn print(&self, doc: &impl Serialize) -> anyhow::Result<()> {
        print!("{}", render(self.format(), doc)?);
        Ok(())
    }
}

/// `doc` as a JSON (pretty, one trailing line break) or YAML document.
pub(super) fn render(format: Format, doc: &impl Serialize) -> anyhow::Result<String> {
    Ok(match format {
        Format::Yaml => serde_norway::to_string(doc)?,
        _ => format!("{}\n", serde_json::to_string_pretty(doc)?),
    })
}
