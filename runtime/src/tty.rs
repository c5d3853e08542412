//! Attaching kiln's terminal to a container's pty (`-it`): raw mode on kiln's
//! terminal, input and output copied both ways, window-size changes forwarded.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};

/// The window size of kiln's own terminal (stdin, else stdout), if it has one.
pub(crate) fn own_winsize() -> Option<kiln_executor::WinSize> {
    kiln_executor::get_winsize(std::io::stdin().as_fd())
        .or_else(|| kiln_executor::get_winsize(std::io::stdout().as_fd()))
}

/// A running attachment; [`Proxy::finish`] waits for the output and restores the
/// terminal (dropping it restores the terminal too).
#[derive(Debug)]
pub(crate) struct Proxy {
    saved: Option<Termios>,
    output: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts copying: the pty's output to kiln's stdout, and (with `input`) kiln's
    /// stdin to the pty. kiln's terminal, when stdin is one, goes into raw mode so
    /// that Ctrl-C, Ctrl-D and friends reach the container's line discipline.
    pub(crate) fn attach(master: OwnedFd, input: bool) -> std::io::Result<Self> {
        let stdin = std::io::stdin();
        let saved = if input {
            tcgetattr(stdin.as_fd()).ok()
        } else {
            None
        };
        if let Some(t) = &saved {
            let mut raw = t.clone();
            cfmakeraw(&mut raw);
            tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).map_err(std::io::Error::from)?;
        }
        let mut proxy = Self {
            saved,
            output: None,
        };
        // Block SIGWINCH here before the threads start (they inherit the mask), so
        // it stays pending for the signalfd of the resize thread.
        let mut winch = SigSet::empty();
        winch.add(Signal::SIGWINCH);
        let _blocked = winch.thread_block();
        if let (Ok(fd), Ok(resize_master)) = (
            SignalFd::with_flags(&winch, SfdFlags::SFD_CLOEXEC),
            master.try_clone(),
        ) {
            std::thread::spawn(move || {
                while let Ok(Some(_)) = fd.read_signal() {
                    if let Some(size) = own_winsize() {
                        let _resized = kiln_executor::set_winsize(resize_master.as_fd(), size);
                    }
                }
            });
        }
        if input {
            let mut to_pty = std::fs::File::from(master.try_clone()?);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut stdin = std::io::stdin();
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if to_pty.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
        let mut from_pty = std::fs::File::from(master);
        let output = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            let mut stdout = std::io::stdout();
            loop {
                // EIO once every holder of the slave side is gone.
                match from_pty.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stdout
                            .write_all(&buf[..n])
                            .and_then(|()| stdout.flush())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        proxy.output = Some(output);
        Ok(proxy)
    }

    /// Waits until the pty's output is copied, then restores kiln's terminal.
    pub(crate) fn finish(mut self) {
        if let Some(out) = self.output.take() {
            let _copied = out.join();
        }
        self.restore();
    }

    fn restore(&mut self) {
        if let Some(t) = self.saved.take() {
            let _restored = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &t);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.restore();
    }
}
