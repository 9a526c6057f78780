//! Lines for a command's standard output, whose reader may be gone.
//!
//! `println!` panics when stdout is a closed pipe (`tinyscheduler delete task a b | head -0`),
//! which stopped a command half-way through its work with a backtrace. A command's output is a
//! report of what it did, so a reader that left is no reason to stop doing it: [`line`] drops
//! output after a broken pipe, and an output that fails otherwise (a full disk behind `>`) is
//! reported once on stderr and makes the command exit 1 ([`failed`]).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static FAILED: AtomicBool = AtomicBool::new(false);

/// Writes `text` and a newline to stdout, as one write of the locked stream.
pub fn line(text: std::fmt::Arguments<'_>) {
    let mut buf = text.to_string();
    buf.push('\n');
    write(buf.as_bytes());
}

/// Writes `bytes` to stdout as they are.
pub fn write(bytes: &[u8]) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() != io::ErrorKind::BrokenPipe && !FAILED.swap(true, Ordering::Relaxed) {
            eprintln!("error: writing output: {e}");
        }
    }
}

/// Whether some output could not be written for another reason than a closed pipe.
pub fn failed() -> bool {
    FAILED.load(Ordering::Relaxed)
}

/// `println!` for command output: see the module docs.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::write(b"\n")
    };
    ($($arg:tt)*) => {
        $crate::stdout::line(format_args!($($arg)*))
    };
}
