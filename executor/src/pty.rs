//! Pseudo-terminals for `run -t` / `exec -t`: open a pair, read and set the
//! window size (the ioctls `nix` does not wrap).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// A pty pair: the caller keeps `master`, the sandbox gets `slave` as its stdio.
#[derive(Debug)]
pub struct Pty {
    /// The side the caller reads output from and writes input to.
    pub master: OwnedFd,
    /// The terminal the payload sees.
    pub slave: OwnedFd,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Opens a pty pair (close-on-exec on both sides), sized `size` when given.
pub fn openpty(size: Option<WinSize>) -> std::io::Result<Pty> {
    let ws = size.map(|s| nix::pty::Winsize {
        ws_row: s.rows,
        ws_col: s.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let pair = nix::pty::openpty(ws.as_ref(), None).map_err(std::io::Error::from)?;
    for fd in [&pair.master, &pair.slave] {
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(std::io::Error::from)?;
    }
    Ok(Pty {
        master: pair.master,
        slave: pair.slave,
    })
}

/// The window size of the terminal `fd` (`TIOCGWINSZ`); `None` when it is no terminal.
pub fn get_winsize(fd: BorrowedFd<'_>) -> Option<WinSize> {
    // SAFETY: winsize is plain old data; all-zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (ret == 0).then_some(WinSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Sets the window size of the terminal `fd` (`TIOCSWINSZ`); the kernel then
/// sends SIGWINCH to the terminal's foreground process group.
pub fn set_winsize(fd: BorrowedFd<'_>, size: WinSize) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the struct we own.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
