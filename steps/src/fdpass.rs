//! Passing file descriptors over a Unix socket (`SCM_RIGHTS`): the QMP
//! client hands QEMU a file for `getfd`, and `vsnap serve`'s clients hand
//! it their standard descriptors and working directory.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The credentials the kernel recorded for the other end of the unix
/// socket `sock` when it connected (`SO_PEERCRED`): pid, uid, gid.
pub fn peer_cred(sock: RawFd) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of their sizes; an
    // invalid fd is an error return, not undefined behaviour.
    let r = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// One `sendmsg` on the socket `sock` of `data` with the descriptors
/// `fds` (MSG_NOSIGNAL: a closed peer is an error, never a SIGPIPE).
/// Returns how many bytes of `data` went; the descriptors go with the
/// first of them.
pub fn send(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below (iov, cbuf)
    // stays valid until sendmsg returns, and cbuf has CMSG_SPACE bytes,
    // room for one header carrying `fds`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), fd_bytes);
        let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// One `recvmsg` on `sock` into `data`, taking up to `max_fds`
/// descriptors that came with it (close-on-exec, owned: none leaks).
/// Returns how many bytes were read and the descriptors.
pub fn recv(sock: RawFd, data: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: as in `send`; each received descriptor is wrapped in an
    // OwnedFd as soon as it is read from the control message.
    unsafe {
        let space = libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) as usize;
        let mut cbuf = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(cmsg) as *const RawFd;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, fds))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_arrive_with_the_data_and_work() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"through the socket").unwrap();
        let dir = std::fs::File::open("/").unwrap();
        assert_eq!(
            super::send(a.as_raw_fd(), b"hi", &[f.as_raw_fd(), dir.as_raw_fd()]).unwrap(),
            2
        );
        let mut buf = [0u8; 8];
        let (n, fds) = super::recv(b.as_raw_fd(), &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(fds.len(), 2);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the socket");
    }
}
