//! `latchkey install-module DIR`: the in-process module shipped with this binary, copied
//! where an Envoy loads it from (its ENVOY_DYNAMIC_MODULES_SEARCH_PATH). In Kubernetes an
//! init container runs it from latchkey's image into a volume Envoy's container mounts,
//! so the module Envoy loads is always the one of the `serve` beside it: the policy
//! channel refuses a module of any other build, which would leave Envoy handing every
//! request on.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::envoy::module::wire::BUILD;

/// The module's file name, as Envoy's config names it (`latchkey_module`).
pub const FILE: &str = "liblatchkey_module.so";

/// The hook Envoy calls first in every module, by name.
const MODULE_HOOK: &[u8] = b"envoy_dynamic_module_on_program_init";

/// Where the module ships beside the binary `exe`: in the same directory (a cargo
/// build's target directory), or in `../lib/latchkey` (the image's
/// /usr/local/lib/latchkey).
pub fn shipped(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    [dir.join(FILE), dir.join("../lib/latchkey").join(FILE)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The running binary's own path. `/proc/self/exe` where /proc is mounted; else the
/// absolute path it was started by (an image's entrypoint is one).
pub fn this_binary() -> anyhow::Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe() {
        return Ok(exe);
    }
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .context("cannot tell where this binary is (no /proc, started by a relative name)")
}

/// Copies the module at `from` into `dir` (made if missing) as [`FILE`], read-only, and
/// returns its path.
/// Refuses a file that is not an Envoy module naming this latchkey's build: a check
/// against a stale or wrong file, not a proof (the policy channel refuses a module of
/// another build whatever this let through). Written beside its final name and renamed
/// into it, so an Envoy starting meanwhile never loads half a file.
pub fn install(from: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    anyhow::ensure!(
        bytes.starts_with(b"\x7fELF"),
        "{} is not a shared library",
        from.display()
    );
    anyhow::ensure!(
        memchr::memmem::find(&bytes, MODULE_HOOK).is_some(),
        "{} is not an Envoy module (it exports no {})",
        from.display(),
        String::from_utf8_lossy(MODULE_HOOK)
    );
    anyhow::ensure!(
        memchr::memmem::find(&bytes, BUILD.as_bytes()).is_some(),
        "{} is not the module of this latchkey ({BUILD}): serve would refuse it",
        from.display()
    );
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(FILE);
    // In a container this process is often pid 1 every time: a copy a killed run left
    // is removed first.
    let staged = dir.join(format!(".{FILE}.{}", std::process::id()));
    let _ = fs::remove_file(&staged);
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&staged)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&staged, &target)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&staged);
        anyhow::anyhow!("writing {}: {e}", target.display())
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn module_of(build: &str) -> Vec<u8> {
        let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
        bytes.extend_from_slice(MODULE_HOOK);
        bytes.extend_from_slice(b"...rodata...");
        bytes.extend_from_slice(build.as_bytes());
        bytes.extend_from_slice(b"...");
        bytes
    }

    #[test]
    fn copies_this_builds_module_read_only_and_replaces_an_old_one() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("built.so");
        fs::write(&from, module_of(BUILD)).unwrap();
        let dir = tmp.path().join("modules");
        assert_eq!(
            install(&from, &dir).unwrap(),
            dir.join(FILE),
            "a missing directory is made"
        );
        fs::remove_file(dir.join(FILE)).unwrap();
        fs::write(dir.join(FILE), b"an older module").unwrap();

        let target = install(&from, &dir).unwrap();
        assert_eq!(target, dir.join(FILE));
        assert_eq!(fs::read(&target).unwrap(), module_of(BUILD));
        let mode = fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        // Nothing staged is left behind; a second run replaces the read-only file, and
        // one whose staged copy a killed run left (the same pid, as pid 1 in a container
        // always is) goes through.
        fs::write(dir.join(format!(".{FILE}.{}", std::process::id())), b"half").unwrap();
        install(&from, &dir).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        assert_eq!(fs::read(&target).unwrap(), module_of(BUILD));
    }

    #[test]
    fn refuses_another_builds_module_or_any_other_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let other = dir.join("other.so");
        fs::write(&other, module_of("0.0.0/wire-0")).unwrap();
        let err = install(&other, dir).unwrap_err().to_string();
        assert!(err.contains("not the module of this latchkey"), "{err}");
        let text = dir.join("notes.txt");
        fs::write(&text, BUILD).unwrap();
        let err = install(&text, dir).unwrap_err().to_string();
        assert!(err.contains("not a shared library"), "{err}");
        // An ELF file of this build that is no module (latchkey's own binary, say).
        let binary = dir.join("latchkey");
        fs::write(&binary, [&b"\x7fELF"[..], BUILD.as_bytes()].concat()).unwrap();
        let err = install(&binary, dir).unwrap_err().to_string();
        assert!(err.contains("not an Envoy module"), "{err}");
        assert!(!dir.join(FILE).exists());
    }

    #[test]
    fn finds_the_module_beside_the_binary_or_in_lib() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("usr/local/bin");
        let lib = tmp.path().join("usr/local/lib/latchkey");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&lib).unwrap();
        let exe = bin.join("latchkey");
        assert_eq!(shipped(&exe), None);
        fs::write(lib.join(FILE), b"m").unwrap();
        let found = shipped(&exe).unwrap();
        assert_eq!(fs::canonicalize(found).unwrap(), lib.join(FILE));
        fs::write(bin.join(FILE), b"m").unwrap();
        assert_eq!(shipped(&exe).unwrap(), bin.join(FILE));
    }
}
