//! Poison-tolerant locking: the one way Mooring takes a `std::sync` lock.
//!
//! A panic while a lock is held poisons it. Every critical section in Mooring is short and
//! updates whole entries (a store call is one transaction), so the data behind a poisoned lock is
//! still consistent: one task's panic must not wedge the broker, the server or an agent. These
//! take the guard either way; use them instead of `lock().unwrap()` or an inline
//! `unwrap_or_else(|p| p.into_inner())`.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, poisoned or not.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes a read lock on `l`, poisoned or not.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes the write lock on `l`, poisoned or not.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = Mutex::new(1);
        let l = RwLock::new(1);
        let _ = std::panic::catch_unwind(|| {
            let _m = lock(&m);
            let _l = write(&l);
            panic!("poison both");
        });
        assert!(m.is_poisoned() && l.is_poisoned());
        *lock(&m) += 1;
        *write(&l) += 1;
        assert_eq!((*lock(&m), *read(&l)), (2, 2));
    }
}
