//! The store's global revision counter, handed out without an fsync per write.
//!
//! The `revision` file holds one line: `<current> <reserved> <boot id>`. Every write takes
//! `current + 1` under the store lock and writes the line back in place (page cache only). Only when
//! `current` would pass `reserved` is a new block reserved and the line fsynced *before* the revision
//! is used, so every revision ever handed out is at most the durable `reserved`. The page cache is
//! shared by every process on the machine, so `current` is exact across processes and across process
//! crashes; only a machine crash can lose it, and a machine crash changes the kernel's boot id. A
//! line whose boot id is not this boot's is therefore read as `current = reserved`: the counter
//! jumps over whatever the lost boot may have handed out. A crash leaves a gap, never a repeat.
//!
//! One durable write in [`RESERVE`] costs an fsync; the other writes cost a `pread` and a `pwrite`.
//!
//! A counter file that is missing (created empty when the store opens), empty or unreadable is
//! not read as zero, which would hand out revisions again: the caller re-bases it on the highest
//! revision the stored objects hold (see [`take_next`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// How many revisions one fsync of the counter reserves.
pub const RESERVE: u64 = 1024;

/// Longest line the file holds (two 20-digit numbers, a 36-character boot id, separators).
const LINE_MAX: usize = 128;

/// The counter as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// The last revision handed out (exact when `boot` is this boot's).
    pub current: u64,
    /// Every revision handed out is at most this; it was fsynced before any of them was used.
    pub reserved: u64,
    /// The boot id of the machine run that wrote the line; empty for a file without one.
    pub boot: String,
}

impl Counter {
    /// Parses the file's content. A pre-reservation file holds one number: that number is both the
    /// current revision and durable. `None` for empty or unreadable content: what the counter was
    /// is unknown.
    pub fn parse(text: &str) -> Option<Counter> {
        let mut parts = text.split_whitespace();
        let current: u64 = parts.next()?.parse().ok()?;
        let reserved = match parts.next() {
            Some(s) => s.parse::<u64>().ok()?.max(current),
            None => current,
        };
        let boot = parts.next().unwrap_or_default().to_string();
        Some(Counter {
            current,
            reserved,
            boot,
        })
    }

    /// The last revision that may have been handed out, as seen from a run with boot id `boot`.
    pub fn last_handed_out(&self, boot: &str) -> u64 {
        if self.boot == boot {
            self.current
        } else {
            self.reserved
        }
    }

    fn line(&self) -> String {
        format!("{:020} {:020} {}\n", self.current, self.reserved, self.boot)
    }
}

/// This machine run's boot id (`/proc/sys/kernel/random/boot_id`). Where it cannot be read, a
/// value that never matches a stored one, so every write reserves durably (the slow, safe path).
pub fn boot_id() -> &'static str {
    static BOOT: OnceLock<String> = OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// Reads the counter from the open file; `None` when it is empty or unreadable.
pub fn read(file: &File) -> io::Result<Option<Counter>> {
    let mut buf = [0u8; LINE_MAX];
    let n = file.read_at(&mut buf, 0)?;
    Ok(Counter::parse(&String::from_utf8_lossy(&buf[..n])))
}

/// Takes the next revision: the caller holds the store lock. `boot` is this run's boot id; an
/// empty one disables the page-cache path.
///
/// When the file holds no readable counter, `rebase` says the highest revision that may have been
/// handed out (the caller looks at the stored objects); the counter goes on after it, reserving
/// (and fsyncing) a new block first. If `rebase` fails, nothing is handed out.
pub fn take_next(
    file: &File,
    boot: &str,
    rebase: impl FnOnce() -> io::Result<u64>,
) -> io::Result<u64> {
    let read = read(file)?;
    let rebased = read.is_none();
    let stored = match read {
        Some(c) => c,
        None => {
            let floor = rebase()?;
            // No boot id: read as `reserved`, and the line is fsynced before `floor + 1` is used.
            Counter {
                current: floor,
                reserved: floor,
                boot: String::new(),
            }
        }
    };
    let next = stored.last_handed_out(boot) + 1;
    let durable = !boot.is_empty() && stored.boot == boot && next <= stored.reserved;
    let counter = Counter {
        current: next,
        reserved: if durable {
            stored.reserved
        } else if boot.is_empty() {
            next
        } else {
            next + RESERVE - 1
        },
        boot: boot.to_string(),
    };
    let line = counter.line();
    file.write_all_at(line.as_bytes(), 0)?;
    if rebased && file.metadata()?.len() > line.len() as u64 {
        // What is left after the line of a longer, unreadable content.
        file.set_len(line.len() as u64)?;
    }
    if !durable {
        file.sync_data()?;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For a counter that needs no re-basing: a fresh file starts from nothing stored.
    fn no_rebase() -> io::Result<u64> {
        Ok(0)
    }

    fn file() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let f = crate::store::fsio::open_private(&dir.path().join("revision")).unwrap();
        (dir, f)
    }

    #[test]
    fn revisions_count_up_by_one_within_a_boot() {
        let (_d, f) = file();
        let got: Vec<u64> = (0..5)
            .map(|_| take_next(&f, "boot-a", no_rebase).unwrap())
            .collect();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        let c = read(&f).unwrap().unwrap();
        assert_eq!(
            (c.current, c.reserved, c.boot.as_str()),
            (5, RESERVE, "boot-a")
        );
    }

    #[test]
    fn a_new_boot_continues_after_everything_reserved_never_repeating() {
        let (_d, f) = file();
        for _ in 0..3 {
            take_next(&f, "boot-a", no_rebase).unwrap();
        }
        // The machine crashed: whatever `current` said may be lost, `reserved` was durable.
        assert_eq!(take_next(&f, "boot-b", no_rebase).unwrap(), RESERVE + 1);
        let c = read(&f).unwrap().unwrap();
        assert_eq!(
            c.reserved,
            2 * RESERVE,
            "the new boot reserves durably first"
        );
        assert_eq!(take_next(&f, "boot-b", no_rebase).unwrap(), RESERVE + 2);
    }

    #[test]
    fn passing_the_reservation_reserves_the_next_block() {
        let (_d, f) = file();
        for _ in 0..RESERVE {
            take_next(&f, "b", no_rebase).unwrap();
        }
        assert_eq!(read(&f).unwrap().unwrap().reserved, RESERVE);
        assert_eq!(take_next(&f, "b", no_rebase).unwrap(), RESERVE + 1);
        assert_eq!(read(&f).unwrap().unwrap().reserved, 2 * RESERVE);
    }

    #[test]
    fn a_counter_file_from_before_reservations_goes_on_after_its_number() {
        let (_d, f) = file();
        f.write_all_at(format!("{:020}", 42).as_bytes(), 0).unwrap();
        assert_eq!(read(&f).unwrap().unwrap().last_handed_out("b"), 42);
        assert_eq!(take_next(&f, "b", no_rebase).unwrap(), 43);
    }

    #[test]
    fn without_a_boot_id_every_revision_is_reserved_durably() {
        let (_d, f) = file();
        assert_eq!(take_next(&f, "", no_rebase).unwrap(), 1);
        assert_eq!(take_next(&f, "", no_rebase).unwrap(), 2);
        let c = read(&f).unwrap().unwrap();
        assert_eq!(
            (c.current, c.reserved),
            (2, 2),
            "each one was fsynced as it was taken"
        );
    }

    #[test]
    fn an_empty_or_unreadable_counter_goes_on_after_the_revision_it_is_rebased_on() {
        for content in ["", "garbage", "\0\0\0\0", "00000000000000000007 x7 boot-a"] {
            let (_d, f) = file();
            f.write_all_at(content.as_bytes(), 0).unwrap();
            assert_eq!(read(&f).unwrap(), None, "{content:?}");
            assert_eq!(take_next(&f, "b", || Ok(41)).unwrap(), 42, "{content:?}");
            let c = read(&f).unwrap().expect("a counter again");
            assert_eq!((c.current, c.reserved), (42, 41 + RESERVE), "{content:?}");
            assert_eq!(take_next(&f, "b", || unreachable!()).unwrap(), 43);
        }
    }

    #[test]
    fn a_counter_that_cannot_be_rebased_hands_out_nothing() {
        let (_d, f) = file();
        let e = take_next(&f, "b", || Err(io::Error::other("objects unreadable"))).unwrap_err();
        assert!(e.to_string().contains("objects unreadable"), "{e}");
        assert_eq!(read(&f).unwrap(), None, "nothing was written");
    }
}
