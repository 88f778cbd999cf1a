//! `latchkey apply --diff`: each item the draft changes, its text before and after, line
//! by line. Secrets are never printed: a credential's secret and keys show as `…`.

use crate::control::items::{self, Kind};
use crate::pb::Change;
use crate::policy::PolicyFile;

fn kind(name: &str) -> Option<Kind> {
    match name {
        "target" => Some(Kind::Target),
        "credential" => Some(Kind::Credential),
        "proxy" => Some(Kind::Proxy),
        "rule" => Some(Kind::Rule),
        _ => None,
    }
}

/// An item's text as the diff shows it, or none when the file has no such item.
fn text(file: &PolicyFile, kind: Kind, name: &str) -> Option<String> {
    let (_, mut value) = items::list(file, kind)
        .into_iter()
        .find(|(n, _)| n == name)?;
    if let Some(item) = value.as_object_mut() {
        for hidden in ["secret", "keys"] {
            if let Some(v) = item.get_mut(hidden) {
                *v = "…".into();
            }
        }
    }
    Some(serde_norway::to_string(&value).unwrap_or_default())
}

/// The lines of `old` and `new`, each marked ` ` (both), `-` (old only) or `+` (new
/// only), in order: a longest common subsequence, which items are small enough for.
pub(super) fn lines<'a>(old: &'a str, new: &'a str) -> Vec<(char, &'a str)> {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let mut common = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            common[i][j] = if a[i] == b[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push((' ', a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || common[i][j + 1] >= common[i + 1][j]) {
            out.push(('+', b[j]));
            j += 1;
        } else {
            out.push(('-', a[i]));
            i += 1;
        }
    }
    out
}

/// Prints each change's item before (the live policy) and after (the draft).
pub(super) fn print(changes: &[Change], live: &PolicyFile, draft: &PolicyFile) {
    for c in changes {
        let Some(kind) = kind(&c.kind) else { continue };
        println!("{} {}: {}", c.kind, c.name, c.action);
        let old = text(live, kind, &c.name).unwrap_or_default();
        let new = text(draft, kind, &c.name).unwrap_or_default();
        let diff = lines(&old, &new);
        if diff.iter().all(|(mark, _)| *mark == ' ') {
            println!("  (its secret or keys)");
        }
        for (mark, line) in diff {
            println!("  {mark} {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_order_and_mark_what_changed() {
        let old = "name: a\nlimit: 5\nnotes: x\n";
        let new = "name: a\nlimit: 6\nnotes: x\nextra: y\n";
        let marks: Vec<String> = lines(old, new)
            .into_iter()
            .map(|(m, l)| format!("{m}{l}"))
            .collect();
        assert_eq!(
            marks,
            [
                " name: a",
                "+limit: 6",
                "-limit: 5",
                " notes: x",
                "+extra: y"
            ]
        );
        assert!(lines("", "").is_empty());
        assert_eq!(lines("a\n", ""), [('-', "a")]);
    }

    #[test]
    fn secrets_never_show() {
        let file = PolicyFile::parse(
            "credentials:\n  - { name: c, type: target, auth: bearer, secret: { value: sk_SECRET_1 } }\n",
        )
        .unwrap();
        let shown = text(&file, Kind::Credential, "c").unwrap();
        assert!(
            !shown.contains("sk_SECRET_1") && shown.contains("secret: …"),
            "{shown}"
        );
    }
}
