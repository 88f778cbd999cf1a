//! The module runs only in the Envoy it was written for. Envoy checks a dynamic
//! module's ABI version by name alone and only warns on a mismatch, so a changed hook
//! signature would go unnoticed until it crashed; the module looks for its Envoy's
//! build revision in the running binary instead, and refuses to load without it.

use std::path::Path;

/// The build revision of the Envoy the Makefile installs (`envoy --version`).
pub const ENVOY_REVISION: &str = "9e5580933739775e8bce696a57a2e1bc99368f23";
pub const ENVOY_VERSION: &str = "1.40.0";

/// Why the binary at `exe` is not the Envoy the module was written for, if it is not.
pub fn mismatch(exe: &Path) -> Option<String> {
    let binary = match std::fs::read(exe) {
        Ok(bytes) => bytes,
        Err(e) => return Some(format!("cannot read {}: {e}", exe.display())),
    };
    let found = memchr::memmem::find(&binary, ENVOY_REVISION.as_bytes()).is_some();
    (!found).then(|| {
        format!(
            "this module is built for Envoy {ENVOY_VERSION} (revision {ENVOY_REVISION}) and \
             {} is another build; install Envoy {ENVOY_VERSION}",
            exe.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pinned_build_passes() {
        let dir = tempfile::tempdir().unwrap();
        let pinned = dir.path().join("envoy");
        std::fs::write(&pinned, format!("\0\0{ENVOY_REVISION}/{ENVOY_VERSION}\0")).unwrap();
        assert_eq!(mismatch(&pinned), None);
        let other = dir.path().join("other");
        let revision = ENVOY_REVISION.replace('9', "8");
        std::fs::write(&other, format!("\0{revision}/1.41.0\0")).unwrap();
        assert!(mismatch(&other).unwrap().contains("built for Envoy 1.40.0"));
        assert!(mismatch(&dir.path().join("absent")).is_some());
    }
}
