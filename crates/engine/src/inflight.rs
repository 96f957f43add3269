//! New chunks the backups of one process are storing right now, shared so
//! concurrent backups dedup against each other: servers made from one
//! template and backed up in the same window store their common data once,
//! not once per job.
//!
//! A backup that meets a chunk another running backup of this repository
//! handle has taken on (hashed, not yet indexed) references it without
//! storing it ("borrows" it). Its manifest may name the chunk only once the
//! chunk is indexed, so before writing the manifest it waits until every
//! backup it borrowed from has stored its packs and index objects. If one
//! of them failed first, its chunks may be missing: the borrower then reads
//! its disks again, deduplicating against the index only (what it stored
//! itself is indexed by then, so only the lacking chunks are stored), and
//! no manifest ever names a chunk that is not in the store.
//!
//! Memory: one map entry (~80 bytes) per new chunk of the running backups,
//! each backup's share capped at [`crate::backup`]'s claim cap (past it
//! the backup releases its entries and starts afresh, as its own set did).
//! Backups of other processes or nodes are not seen here: duplicates
//! between them are reduced to one copy by GC (see [`crate::gc`]).

use crate::format::ChunkId;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Still hashing or storing: its chunks may not be in the store yet.
    Writing,
    /// Every pack and index object it wrote is durable.
    Indexed,
    /// It stopped before indexing all it took on.
    Failed,
}

/// One backup attempt taking chunks on.
#[derive(Debug)]
pub(crate) struct Owner {
    state: Mutex<State>,
    changed: Condvar,
}

/// The chunks being written by this process's backups, by their writer.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    chunks: Mutex<HashMap<ChunkId, Arc<Owner>>>,
}

/// One backup attempt's part in the registry. Dropped without
/// [`Share::indexed`], it counts as failed.
pub(crate) struct Share {
    registry: Arc<Registry>,
    me: Arc<Owner>,
    /// Whether this attempt may reference other backups' chunks.
    borrow: bool,
    mine: Mutex<usize>,
    /// The backups it referenced chunks of.
    borrowed: Mutex<Vec<Arc<Owner>>>,
}

/// What the caller of [`Share::claim`] should do with a new chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Store it: this backup took it on.
    Store,
    /// Reference it: this backup or another running one is storing it.
    Reference,
}

impl Registry {
    /// A share for one backup attempt; with `borrow` false it takes on
    /// every new chunk itself (others may still borrow from it).
    pub(crate) fn join(self: &Arc<Self>, borrow: bool) -> Share {
        Share {
            registry: self.clone(),
            me: Arc::new(Owner {
                state: Mutex::new(State::Writing),
                changed: Condvar::new(),
            }),
            borrow,
            mine: Mutex::new(0),
            borrowed: Mutex::new(Vec::new()),
        }
    }

    fn release(&self, me: &Arc<Owner>) {
        self.chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, o| !Arc::ptr_eq(o, me));
    }

    /// Chunks currently registered (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.chunks.lock().expect("registry").len()
    }
}

impl Share {
    /// Takes `id` (a chunk the index lacks) on, or references another
    /// backup's copy in the making. `cap`: past this many chunks taken on,
    /// this backup releases its entries (memory stays bounded; a chunk
    /// repeated far apart may then be stored twice, which GC undoes).
    pub(crate) fn claim(&self, id: ChunkId, cap: usize) -> Claim {
        let mut chunks = self
            .registry
            .chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match chunks.get(&id) {
            Some(o) if Arc::ptr_eq(o, &self.me) => return Claim::Reference,
            Some(o) if self.borrow => {
                let o = o.clone();
                drop(chunks);
                let mut b = self.borrowed.lock().unwrap_or_else(|e| e.into_inner());
                if !b.iter().any(|x| Arc::ptr_eq(x, &o)) {
                    b.push(o);
                }
                return Claim::Reference;
            }
            _ => {}
        }
        let mut mine = self.mine.lock().unwrap_or_else(|e| e.into_inner());
        if *mine >= cap {
            chunks.retain(|_, o| !Arc::ptr_eq(o, &self.me));
            *mine = 0;
        }
        // Not borrowing: a chunk another backup takes on is stored here too,
        // and this backup's copy is the one others see from now on.
        chunks.insert(id, self.me.clone());
        *mine += 1;
        Claim::Store
    }

    /// Every pack and index object of this attempt is durable: backups
    /// that borrowed from it may write their manifests.
    pub(crate) fn indexed(&self) {
        self.set(State::Indexed);
    }

    fn set(&self, s: State) {
        let mut st = self.me.state.lock().unwrap_or_else(|e| e.into_inner());
        if *st == State::Writing {
            *st = s;
        }
        self.me.changed.notify_all();
        drop(st);
        self.registry.release(&self.me);
    }

    /// Waits until every backup this one borrowed from has finished
    /// writing; false if one of them failed (its chunks may be missing).
    /// Call after [`Share::indexed`], so two backups that borrowed from
    /// each other never wait on each other.
    pub(crate) fn wait_borrowed(&self) -> bool {
        let borrowed =
            std::mem::take(&mut *self.borrowed.lock().unwrap_or_else(|e| e.into_inner()));
        let mut ok = true;
        for o in borrowed {
            let mut st = o.state.lock().unwrap_or_else(|e| e.into_inner());
            while *st == State::Writing {
                st = o.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            ok &= *st == State::Indexed;
        }
        ok
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.set(State::Failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowers_wait_for_the_writer_and_learn_its_outcome() {
        let reg = Arc::new(Registry::default());
        let a = reg.join(true);
        let b = reg.join(true);
        let x = ChunkId([7; 32]);
        assert_eq!(a.claim(x, 10), Claim::Store);
        assert_eq!(a.claim(x, 10), Claim::Reference);
        assert_eq!(b.claim(x, 10), Claim::Reference);
        let waiter = std::thread::spawn(move || {
            b.indexed();
            b.wait_borrowed()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "b waits while a writes");
        a.indexed();
        assert!(waiter.join().unwrap());
        assert_eq!(reg.len(), 0, "finished backups leave nothing behind");

        // A writer that fails: the borrower is told.
        let c = reg.join(true);
        let d = reg.join(true);
        assert_eq!(c.claim(x, 10), Claim::Store);
        assert_eq!(d.claim(x, 10), Claim::Reference);
        drop(c);
        d.indexed();
        assert!(!d.wait_borrowed());

        // Not borrowing: it stores the chunk itself.
        let e = reg.join(true);
        let f = reg.join(false);
        assert_eq!(e.claim(x, 10), Claim::Store);
        assert_eq!(f.claim(x, 10), Claim::Store);
        f.indexed();
        assert!(f.wait_borrowed());
        drop(e);
    }

    #[test]
    fn a_backup_past_its_cap_releases_its_entries() {
        let reg = Arc::new(Registry::default());
        let a = reg.join(true);
        for i in 0..5u8 {
            assert_eq!(a.claim(ChunkId([i; 32]), 3), Claim::Store);
        }
        assert!(reg.len() <= 3);
        drop(a);
        assert_eq!(reg.len(), 0);
    }
}
