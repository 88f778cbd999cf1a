//! The C library calls latchkey makes that Rust's standard library does not, kept out of
//! the main crate, which forbids unsafe code.

/// Hands the free pages malloc holds back to the system; whether any went.
///
/// glibc's malloc returns memory only from the top of each arena, so what a policy load
/// frees (the rows read from the store, many times the compiled policy) stays resident
/// wherever a block that lives on sits above it: 16 MB of `latchkey serve`'s 71 MB at
/// 100,000 keys. Walks every arena under its lock: call it after a load, not per request.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    // SAFETY: takes no pointers and, like any malloc call, may be made from any thread.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries give freed memory back themselves, or keep no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// The user of the process at the other end of a connected Unix socket, as the kernel
/// recorded it when the connection was made (`SO_PEERCRED`): unlike the owner of the
/// socket's file, no rename or link between a check and the connect can change it.
#[cfg(target_os = "linux")]
pub fn peer_uid(socket: &impl std::os::fd::AsFd) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed open for the call; `cred` and `len` outlive it,
    // and `len` says how much of `cred` the kernel may write.
    let done = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(std::io::Error::other("SO_PEERCRED answered short"));
    }
    Ok(cred.uid)
}

#[cfg(all(test, target_os = "linux"))]
mod peer_tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socket_pairs_peer_is_this_user_and_a_file_has_none() {
        let (a, _b) = UnixStream::pair().unwrap();
        let own = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        assert_eq!(peer_uid(&a).unwrap(), own.unwrap());
        // Not a socket: refused, not read as uid 0.
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(peer_uid(&file.as_fd()).is_err());
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn resident_kb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// What a load leaves: 64 MB in small blocks, one in 64 of them kept, so no arena's
    /// top is free and `free` alone gives nothing back.
    #[test]
    fn freed_pages_between_live_blocks_go_back() {
        let blocks: Vec<Box<[u8; 256]>> =
            (0..256 * 1024).map(|i| Box::new([i as u8; 256])).collect();
        let kept: Vec<Box<[u8; 256]>> = blocks.into_iter().step_by(64).collect();
        let before = resident_kb();
        assert!(release_free_memory());
        let after = resident_kb();
        assert!(
            before - after > 32 * 1024,
            "resident {before} kB before, {after} kB after"
        );
        assert_eq!(kept.len(), 4096);
        assert!(kept.iter().enumerate().all(|(i, b)| b[0] == (i * 64) as u8));
    }
}
