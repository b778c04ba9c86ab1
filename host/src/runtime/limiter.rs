//! Where the memory and table limits of one sandbox are enforced: a `ResourceLimiter` that totals
//! every linear memory and table of the instance against the handler's [`Limits`].

use crate::limits::{LimitExceeded, LimitKind, Limits};

/// Enforces the memory and table budgets as totals across the whole instance (wasmtime's own
/// `StoreLimits` only bounds each memory separately). Memories and tables only grow within one
/// sandbox, so the running totals are exact.
#[derive(Debug)]
pub struct SandboxLimiter {
    memory_limit: u64,
    table_limit: u64,
    instances: usize,
    memories: usize,
    tables: usize,
    memory_used: u64,
    tables_used: u64,
    /// The growth last granted, taken back if the grow then fails.
    pending_memory: u64,
    pending_table: u64,
}

impl SandboxLimiter {
    /// A limiter for one sandbox with the handler's limits.
    pub fn new(limits: &Limits) -> Self {
        SandboxLimiter {
            memory_limit: limits.memory_bytes,
            table_limit: limits.table_elements,
            instances: limits.instances,
            memories: limits.memories,
            tables: limits.tables,
            memory_used: 0,
            tables_used: 0,
            pending_memory: 0,
            pending_table: 0,
        }
    }

    /// Bytes of linear memory in use across the instance.
    pub fn memory_used(&self) -> u64 {
        self.memory_used
    }
}

impl wasmtime::ResourceLimiter for SandboxLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = (desired as u64).saturating_sub(current as u64);
        let total = self.memory_used.saturating_add(delta);
        if total > self.memory_limit {
            return Err(wasmtime::Error::new(LimitExceeded {
                kind: LimitKind::Memory,
                detail: format!(
                    "growing linear memory to {desired} bytes would use {total} bytes in total; \
                     the limit is {} bytes",
                    self.memory_limit
                ),
            }));
        }
        self.memory_used = total;
        self.pending_memory = delta;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_used = self.memory_used.saturating_sub(self.pending_memory);
        self.pending_memory = 0;
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let delta = (desired as u64).saturating_sub(current as u64);
        let total = self.tables_used.saturating_add(delta);
        if total > self.table_limit {
            return Err(wasmtime::Error::new(LimitExceeded {
                kind: LimitKind::Table,
                detail: format!(
                    "growing a table to {desired} elements would use {total} elements in total; \
                     the limit is {}",
                    self.table_limit
                ),
            }));
        }
        self.tables_used = total;
        self.pending_table = delta;
        Ok(true)
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.tables_used = self.tables_used.saturating_sub(self.pending_table);
        self.pending_table = 0;
        Ok(())
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        self.memories
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use wasmtime::ResourceLimiter;

    #[test]
    fn memory_is_totalled_across_memories() {
        let limits = Limits {
            memory_bytes: 100,
            ..Limits::default()
        };
        let mut l = SandboxLimiter::new(&limits);
        assert!(l.memory_growing(0, 60, None).unwrap());
        // A second memory: each alone is under the limit, together they are over it.
        let err = l.memory_growing(0, 60, None).unwrap_err();
        let hit = err.downcast_ref::<LimitExceeded>().unwrap();
        assert_eq!(hit.kind, LimitKind::Memory);
        assert_eq!(l.memory_used(), 60);
        assert!(l.memory_growing(60, 100, None).unwrap());
        assert_eq!(l.memory_used(), 100);
    }

    #[test]
    fn a_failed_grow_is_given_back() {
        let limits = Limits {
            memory_bytes: 100,
            ..Limits::default()
        };
        let mut l = SandboxLimiter::new(&limits);
        assert!(l.memory_growing(0, 80, None).unwrap());
        l.memory_grow_failed(wasmtime::format_err!("os said no"))
            .unwrap();
        assert_eq!(l.memory_used(), 0);
    }

    #[test]
    fn tables_are_totalled() {
        let limits = Limits {
            table_elements: 10,
            ..Limits::default()
        };
        let mut l = SandboxLimiter::new(&limits);
        assert!(l.table_growing(0, 6, None).unwrap());
        let err = l.table_growing(0, 6, None).unwrap_err();
        assert_eq!(
            err.downcast_ref::<LimitExceeded>().unwrap().kind,
            LimitKind::Table
        );
    }
}
