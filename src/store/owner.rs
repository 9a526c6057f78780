//! Only the state directory's owner writes into it.
//!
//! The store makes its files 0600 and its directories 0700, readable by their owner alone. A write
//! by anyone else (in practice root, whose permission checks always pass) leaves files that the
//! owner's scheduler can no longer read: it cannot list them, `run --once` never syncs, and the
//! daemon never becomes ready. So a writer that is not the owner is refused before it writes a
//! byte, with the command that would work.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{Uid, User};

use super::StoreError;

/// Refuses `root` when it exists and belongs to another user than the effective one.
pub fn check(root: &Path) -> Result<(), StoreError> {
    check_as(root, Uid::effective())
}

fn check_as(root: &Path, me: Uid) -> Result<(), StoreError> {
    let owner = match std::fs::metadata(root) {
        Ok(m) => Uid::from_raw(m.uid()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(root, e)),
    };
    if owner == me {
        return Ok(());
    }
    let user = |uid: Uid| User::from_uid(uid).ok().flatten().map(|u| u.name);
    let name = |uid: Uid, user: &Option<String>| match user {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    let owner_name = user(owner);
    let run_as = owner_name
        .as_ref()
        .map(|n| format!("; run it as that user (sudo -u {n} tinyscheduler …)"))
        .unwrap_or_default();
    Err(StoreError::Refused {
        path: root.to_path_buf(),
        message: format!(
            "the state directory belongs to {}, not to {}: files written now would be \
             unreadable to its owner's scheduler{run_as}",
            name(owner, &owner_name),
            name(me, &user(me))
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_of_an_existing_state_directory_may_write_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Uid::from_raw(std::fs::metadata(dir.path()).unwrap().uid());
        assert!(check_as(dir.path(), owner).is_ok());
        assert!(
            check_as(
                &dir.path().join("not-yet"),
                Uid::from_raw(owner.as_raw() + 1)
            )
            .is_ok(),
            "a state directory still to be made is the writer's own"
        );
        let other = Uid::from_raw(owner.as_raw() + 1);
        let e = check_as(dir.path(), other).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("refusing {}", dir.path().display())),
            "{e}"
        );
        assert!(e.contains(&format!("uid {owner}")), "{e}");
        assert!(e.contains(&format!("uid {other}")), "{e}");
    }
}
