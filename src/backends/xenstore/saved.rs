//! The store and a guest's watches as a save carries them, and back (issue
//! 14). What the guest's ring holds (its indexes, a request it was writing)
//! is guest RAM and travels with it; of its open transactions only the ids
//! travel: a restore reopens each on the restored store, and its commit
//! fails with `EAGAIN`, what a transaction that met a conflicting change
//! gets, so the guest does it again (Linux's xenbus users all loop on it).

use super::perms::{Perm, PermKind, Perms};
use super::store::Store;
use super::{make_watch, XenstoreServer, XsError};

/// One node: absolute path, value, permissions (first entry the owner) as
/// (domid, `b'n'`/`b'r'`/`b'w'`/`b'b'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedNode {
    /// Absolute path.
    pub path: String,
    /// Value.
    pub value: Vec<u8>,
    /// Permissions.
    pub perms: Vec<(u16, u8)>,
}

fn letter(k: PermKind) -> u8 {
    match k {
        PermKind::None => b'n',
        PermKind::Read => b'r',
        PermKind::Write => b'w',
        PermKind::Both => b'b',
    }
}

fn kind(l: u8) -> Result<PermKind, XsError> {
    Ok(match l {
        b'n' => PermKind::None,
        b'r' => PermKind::Read,
        b'w' => PermKind::Write,
        b'b' => PermKind::Both,
        _ => return Err(XsError::Inval),
    })
}

fn child(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

impl XenstoreServer {
    /// Every node but `/`, parents before their children and children in
    /// creation order (so a restore keeps `DIRECTORY`'s order).
    pub fn export_nodes(&self) -> Vec<SavedNode> {
        let mut out = Vec::with_capacity(self.store.len());
        let mut stack: Vec<String> = vec!["/".into()];
        while let Some(p) = stack.pop() {
            let Some(n) = self.store.get(&p) else {
                continue;
            };
            for c in n.children.iter().rev() {
                stack.push(child(&p, c));
            }
            if p != "/" {
                out.push(SavedNode {
                    value: n.value.clone(),
                    perms: n
                        .perms
                        .entries()
                        .iter()
                        .map(|e| (e.domid, letter(e.kind)))
                        .collect(),
                    path: p,
                });
            }
        }
        out
    }

    /// `domid`'s watches as it registered them: (path, token).
    pub fn export_watches(&self, domid: u16) -> Vec<(String, Vec<u8>)> {
        self.conns.get(&domid).map_or_else(Vec::new, |c| {
            c.watches
                .iter()
                .map(|w| (w.spec.clone(), w.token.clone()))
                .collect()
        })
    }

    /// The ids of `domid`'s open transactions.
    pub fn export_transactions(&self, domid: u16) -> Vec<u32> {
        self.conns
            .get(&domid)
            .map_or_else(Vec::new, |c| c.txs.keys().copied().collect())
    }

    /// Reopens transactions `ids` of `domid` (after [`import`](Self::import))
    /// on the store as it is now, each marked stale: reads and writes in it
    /// work, its commit fails with `EAGAIN`, an abort succeeds. New ids
    /// continue above the highest.
    pub fn import_transactions(&mut self, domid: u16, ids: &[u32]) -> Result<(), XsError> {
        let conn = self.conns.get_mut(&domid).ok_or(XsError::NoEnt)?;
        if ids.contains(&0) || ids.len() > self.quotas.max_transactions.max(1) * 8 {
            return Err(XsError::Inval);
        }
        for &id in ids {
            conn.txs.insert(
                id,
                super::conn::Tx {
                    store: self.store.snapshot(),
                    events: Vec::new(),
                    stale: true,
                },
            );
            self.next_tx = self.next_tx.max(id);
        }
        Ok(())
    }

    /// Replaces the whole store with `nodes` (parents first, as
    /// [`export_nodes`](Self::export_nodes) lists them; a missing parent is
    /// created with its parent's permissions) and `domid`'s watches with
    /// `watches`, firing no watch: the guest saw every event before the save.
    /// Nothing changes if a node or watch is refused.
    pub fn import(
        &mut self,
        domid: u16,
        nodes: &[SavedNode],
        watches: &[(String, Vec<u8>)],
    ) -> Result<(), XsError> {
        let q = self.quotas;
        let mut st = Store::new();
        for n in nodes {
            let perms = Perms::from_entries(
                n.perms
                    .iter()
                    .map(|&(d, l)| kind(l).map(|kind| Perm { kind, domid: d }))
                    .collect::<Result<Vec<_>, _>>()?,
            )?;
            let p = super::resolve(0, &n.path)?;
            st.write(0, &p, &n.value, &q)?;
            st.set_perms(0, &p, perms, &q)?;
        }
        let ws = watches
            .iter()
            .map(|(p, t)| make_watch(domid, p, t))
            .collect::<Result<Vec<_>, _>>()?;
        let conn = self.conns.get_mut(&domid).ok_or(XsError::NoEnt)?;
        conn.watches = ws;
        conn.txs.clear();
        self.store = st;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::DomainConfig;
    use super::*;

    fn server(name: &str) -> XenstoreServer {
        XenstoreServer::new_domain(&DomainConfig::new(1, name, [7; 16], 65536)).unwrap()
    }

    #[test]
    fn xenstore_import_of_an_export_gives_the_same_tree_and_watches() {
        let mut a = server("first");
        a.write("/local/domain/1/data/b", b"2").unwrap();
        a.write("/local/domain/1/data/a", b"1").unwrap();
        let p = Perms::new(1, PermKind::Read).with(0, PermKind::Both);
        a.set_perms("/local/domain/1/data/a", &p).unwrap();
        let nodes = a.export_nodes();
        assert_eq!(nodes.len() + 1, a.node_count(), "every node but /");
        let watches = vec![
            ("data".to_string(), b"t1".to_vec()),
            ("/local/domain/1/control".to_string(), b"t2".to_vec()),
        ];
        // A server built for another name: the import replaces its tree.
        let mut b = server("second");
        b.import(1, &nodes, &watches).unwrap();
        assert_eq!(b.export_nodes(), nodes);
        assert_eq!(b.read_string("/local/domain/1/name").unwrap(), "first");
        assert_eq!(b.get_perms("/local/domain/1/data/a").unwrap(), p);
        // Directory order (creation order) is kept: b before a.
        assert_eq!(b.directory("/local/domain/1/data").unwrap(), ["b", "a"]);
        assert_eq!(b.export_watches(1), watches);
        assert!(b.take_events().is_empty(), "an import fires nothing");
        b.check_invariants().unwrap();
    }

    #[test]
    fn xenstore_import_refuses_a_bad_permission_and_keeps_the_store() {
        let mut b = server("second");
        let bad = [SavedNode {
            path: "/x".into(),
            value: Vec::new(),
            perms: vec![(0, b'q')],
        }];
        assert!(b.import(1, &bad, &[]).is_err());
        assert_eq!(b.read_string("/local/domain/1/name").unwrap(), "second");
        assert!(b.import(9, &[], &[]).is_err(), "no such connection");
    }
}
