//! The node database and the store-level operations with Xen's permission
//! and quota rules.
//!
//! Nodes live in a flat map from canonical path to a reference-counted node,
//! so a transaction's private copy of the whole store (xenstore's documented
//! model: "when a transaction is started whole db is copied") costs one
//! pointer copy per node. Every node carries a generation number, bumped on
//! each change; a transaction records the generation of every node it
//! touches (absent nodes included) at first touch, and commits only if all of
//! them are still the same in the live store, else `EAGAIN`. Only conflicting
//! changes fail a transaction, the refinement xenstore.txt names as the plan.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::path::{join, leaf, parent};
use super::perms::{PermKind, Perms};
use super::wire::XsError;
use super::Quotas;

/// One node: a value, its permissions and its children's leaf names (in
/// creation order).
#[derive(Clone, Debug)]
pub struct Node {
    /// The value (arbitrary bytes, usually ASCII without a NUL).
    pub value: Vec<u8>,
    /// The permissions.
    pub perms: Perms,
    /// Leaf names of the children.
    pub children: Vec<Arc<str>>,
    /// Generation: changes whenever value, perms or children change.
    pub gen: u64,
}

/// A change to report to watchers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The changed node (or special name, `@...`).
    pub path: Arc<str>,
    /// The node and its subtree were removed: watches below `path` fire too.
    pub removed: bool,
    /// The node's permissions (before removal, for `removed`): a domain that
    /// cannot read the node is not told.
    pub perms: Perms,
}

/// What a transaction touched.
#[derive(Clone, Debug, Default)]
struct TxLog {
    /// Generation (or absence) of each touched node at first touch.
    accessed: HashMap<Arc<str>, Option<u64>>,
    /// Nodes created, changed or deleted.
    modified: HashSet<Arc<str>>,
}

/// The database (the live store, or a transaction's copy when `log` is set).
#[derive(Clone, Debug)]
pub struct Store {
    nodes: HashMap<Arc<str>, Arc<Node>>,
    owned: HashMap<u16, u32>,
    next_gen: u64,
    log: Option<TxLog>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// A store with only `/`, owned by dom0, unreadable by others.
    pub fn new() -> Self {
        let mut s = Store {
            nodes: HashMap::new(),
            owned: HashMap::new(),
            next_gen: 1,
            log: None,
        };
        s.put(
            "/",
            Node {
                value: Vec::new(),
                perms: Perms::new(0, PermKind::None),
                children: Vec::new(),
                gen: 0,
            },
        );
        s
    }

    /// A private copy for a transaction.
    pub fn snapshot(&self) -> Store {
        Store {
            nodes: self.nodes.clone(),
            owned: self.owned.clone(),
            next_gen: self.next_gen,
            log: Some(TxLog::default()),
        }
    }

    /// Number of nodes in the store.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Number of nodes owned by `domid`.
    pub fn owned_by(&self, domid: u16) -> u32 {
        self.owned.get(&domid).copied().unwrap_or(0)
    }

    /// The node at a canonical path (no access recorded).
    pub fn get(&self, path: &str) -> Option<&Arc<Node>> {
        self.nodes.get(path)
    }

    /// Records a transaction's first touch of `path`.
    fn touch(&mut self, path: &str) {
        if let Some(log) = &mut self.log {
            if !log.accessed.contains_key(path) {
                let gen = self.nodes.get(path).map(|n| n.gen);
                log.accessed.insert(Arc::from(path), gen);
            }
        }
    }

    /// Stores a node with a fresh generation, keeping the owner counts.
    fn put(&mut self, path: &str, mut node: Node) {
        self.touch(path);
        node.gen = self.next_gen;
        self.next_gen += 1;
        let key: Arc<str> = match self.nodes.get_key_value(path) {
            Some((k, _)) => k.clone(),
            None => Arc::from(path),
        };
        *self.owned.entry(node.perms.owner()).or_insert(0) += 1;
        if let Some(old) = self.nodes.insert(key.clone(), Arc::new(node)) {
            self.disown(old.perms.owner());
        }
        if let Some(log) = &mut self.log {
            log.modified.insert(key);
        }
    }

    /// Deletes one node (not its children), keeping the owner counts.
    fn del(&mut self, path: &str) {
        self.touch(path);
        if let Some((key, old)) = self.nodes.remove_entry(path) {
            self.disown(old.perms.owner());
            if let Some(log) = &mut self.log {
                log.modified.insert(key);
            }
        }
    }

    fn disown(&mut self, owner: u16) {
        if let Some(c) = self.owned.get_mut(&owner) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.owned.remove(&owner);
            }
        }
    }

    /// The error for a node that does not exist: `ENOENT` if the caller may
    /// read the nearest existing ancestor, `EACCES` if not (so a domain
    /// cannot probe for nodes it may not see).
    fn missing(&self, caller: u16, path: &str) -> XsError {
        let mut cur = path;
        while let Some(p) = parent(cur) {
            if let Some(n) = self.nodes.get(p) {
                return if n.perms.access(caller).can_read() {
                    XsError::NoEnt
                } else {
                    XsError::Acces
                };
            }
            cur = p;
        }
        XsError::NoEnt
    }

    /// The node at `path` if `caller` may read it.
    pub fn readable(&mut self, caller: u16, path: &str) -> Result<Arc<Node>, XsError> {
        self.touch(path);
        match self.nodes.get(path) {
            None => Err(self.missing(caller, path)),
            Some(n) if !n.perms.access(caller).can_read() => Err(XsError::Acces),
            Some(n) => Ok(n.clone()),
        }
    }

    /// `WRITE`: sets the value, creating the node and missing parents.
    pub fn write(
        &mut self,
        caller: u16,
        path: &str,
        value: &[u8],
        q: &Quotas,
    ) -> Result<Event, XsError> {
        if caller != 0 && value.len() > q.max_value {
            return Err(XsError::NoSpc);
        }
        self.touch(path);
        match self.nodes.get(path).cloned() {
            Some(node) => {
                if !node.perms.access(caller).can_write() {
                    return Err(XsError::Acces);
                }
                let mut n = (*node).clone();
                n.value = value.to_vec();
                let perms = n.perms.clone();
                self.put(path, n);
                Ok(Event {
                    path: Arc::from(path),
                    removed: false,
                    perms,
                })
            }
            None => self.create(caller, path, value, q),
        }
    }

    /// `MKDIR`: creates the node (empty) and missing parents; `None` (no
    /// event) if it already exists.
    pub fn mkdir(&mut self, caller: u16, path: &str, q: &Quotas) -> Result<Option<Event>, XsError> {
        self.touch(path);
        match self.nodes.get(path) {
            Some(n) if n.perms.access(caller).can_write() => Ok(None),
            Some(_) => Err(XsError::Acces),
            None => self.create(caller, path, &[], q).map(Some),
        }
    }

    /// Creates `path` and its missing ancestors. New nodes inherit the
    /// nearest existing ancestor's permissions; a domain owns what it
    /// creates. Needs write access to that ancestor; quotas apply to domUs.
    fn create(
        &mut self,
        caller: u16,
        path: &str,
        value: &[u8],
        q: &Quotas,
    ) -> Result<Event, XsError> {
        let mut missing: Vec<&str> = vec![path];
        let mut cur = path;
        let anc = loop {
            let Some(p) = parent(cur) else {
                return Err(XsError::Inval);
            };
            self.touch(p);
            if let Some(n) = self.nodes.get(p) {
                break n.clone();
            }
            missing.push(p);
            cur = p;
        };
        if !anc.perms.access(caller).can_write() {
            return Err(XsError::Acces);
        }
        if caller != 0 {
            let new_total = (self.owned_by(caller) as usize).saturating_add(missing.len());
            if new_total > q.max_nodes as usize || anc.children.len() >= q.max_children {
                return Err(XsError::NoSpc);
            }
        }
        let perms = if caller == 0 {
            anc.perms.clone()
        } else {
            anc.perms.with_owner(caller)
        };
        for p in missing.iter().rev() {
            let par = parent(p).unwrap_or("/");
            if let Some(pn) = self.nodes.get(par) {
                let mut pn = (**pn).clone();
                pn.children.push(Arc::from(leaf(p)));
                self.put(par, pn);
            }
            self.put(
                p,
                Node {
                    value: if *p == path {
                        value.to_vec()
                    } else {
                        Vec::new()
                    },
                    perms: perms.clone(),
                    children: Vec::new(),
                    gen: 0,
                },
            );
        }
        Ok(Event {
            path: Arc::from(path),
            removed: false,
            perms,
        })
    }

    /// `RM`: removes the node and its subtree. Removing a missing node whose
    /// parent exists succeeds without an event.
    pub fn rm(&mut self, caller: u16, path: &str) -> Result<Option<Event>, XsError> {
        let Some(par) = parent(path) else {
            return Err(XsError::Inval);
        };
        self.touch(path);
        let Some(node) = self.nodes.get(path).cloned() else {
            self.touch(par);
            return match self.nodes.get(par) {
                Some(p) if p.perms.access(caller).can_read() => Ok(None),
                Some(_) => Err(XsError::Acces),
                None => Err(self.missing(caller, par)),
            };
        };
        if !node.perms.access(caller).can_write() {
            return Err(XsError::Acces);
        }
        let mut stack = vec![path.to_owned()];
        let mut doomed = Vec::new();
        while let Some(p) = stack.pop() {
            if let Some(n) = self.nodes.get(p.as_str()) {
                stack.extend(n.children.iter().map(|c| join(&p, c)));
            }
            doomed.push(p);
        }
        for p in &doomed {
            self.del(p);
        }
        if let Some(pn) = self.nodes.get(par) {
            let mut pn = (**pn).clone();
            let name = leaf(path);
            pn.children.retain(|c| &**c != name);
            self.put(par, pn);
        }
        Ok(Some(Event {
            path: Arc::from(path),
            removed: true,
            perms: node.perms.clone(),
        }))
    }

    /// `SET_PERMS`: only dom0 or the owner may change permissions, and a
    /// domain may not give its node away.
    pub fn set_perms(
        &mut self,
        caller: u16,
        path: &str,
        perms: Perms,
        q: &Quotas,
    ) -> Result<Event, XsError> {
        self.touch(path);
        let Some(node) = self.nodes.get(path).cloned() else {
            return Err(self.missing(caller, path));
        };
        if caller != 0 {
            if node.perms.owner() != caller || perms.owner() != caller {
                return Err(XsError::Acces);
            }
            if perms.entries().len() > q.max_perms {
                return Err(XsError::NoSpc);
            }
        }
        let mut n = (*node).clone();
        n.perms = perms.clone();
        self.put(path, n);
        Ok(Event {
            path: Arc::from(path),
            removed: false,
            perms,
        })
    }

    /// Commits a transaction's copy into this (live) store: `EAGAIN` if any
    /// node the transaction touched changed since, `ENOSPC` if the commit
    /// would take `caller` over its node quota.
    pub fn commit(&mut self, tx: Store, caller: u16, q: &Quotas) -> Result<(), XsError> {
        let Some(log) = tx.log else {
            return Err(XsError::Inval);
        };
        for (path, gen) in &log.accessed {
            if self.nodes.get(path).map(|n| n.gen) != *gen {
                return Err(XsError::Again);
            }
        }
        if caller != 0 {
            let mut count = i64::from(self.owned_by(caller));
            for path in &log.modified {
                if self
                    .nodes
                    .get(path)
                    .is_some_and(|n| n.perms.owner() == caller)
                {
                    count -= 1;
                }
                if tx
                    .nodes
                    .get(path)
                    .is_some_and(|n| n.perms.owner() == caller)
                {
                    count += 1;
                }
            }
            if count > i64::from(q.max_nodes) && count > i64::from(self.owned_by(caller)) {
                return Err(XsError::NoSpc);
            }
        }
        for path in &log.modified {
            match tx.nodes.get(path) {
                Some(n) => self.put(path, (**n).clone()),
                None => self.del(path),
            }
        }
        Ok(())
    }

    /// All node paths at or below `path`.
    #[cfg(test)]
    pub fn paths_below(&self, path: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .keys()
            .filter(|k| super::path::is_child(k, path))
            .map(|k| k.to_string())
            .collect();
        v.sort();
        v
    }

    /// Checks the tree's internal consistency: every node but `/` is listed
    /// by its parent, every listed child exists, and the owner counts match.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut owned: HashMap<u16, u32> = HashMap::new();
        for (path, node) in &self.nodes {
            *owned.entry(node.perms.owner()).or_insert(0) += 1;
            if let Some(par) = parent(path) {
                let Some(pn) = self.nodes.get(par) else {
                    return Err(format!("{path}: parent missing"));
                };
                let l = leaf(path);
                if pn.children.iter().filter(|c| &***c == l).count() != 1 {
                    return Err(format!("{path}: not listed once by its parent"));
                }
            }
            for c in &node.children {
                if !self.nodes.contains_key(join(path, c).as_str()) {
                    return Err(format!("{path}: child {c} missing"));
                }
            }
        }
        if owned != self.owned {
            return Err(format!("owner counts {:?} != {:?}", self.owned, owned));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> Quotas {
        Quotas::default()
    }

    fn guest_tree() -> Store {
        let mut s = Store::new();
        s.write(0, "/local/domain/1", b"", &q()).unwrap();
        s.set_perms(
            0,
            "/local/domain/1",
            Perms::new(0, PermKind::None).with(1, PermKind::Read),
            &q(),
        )
        .unwrap();
        s.mkdir(0, "/local/domain/1/data", &q()).unwrap();
        s.set_perms(
            0,
            "/local/domain/1/data",
            Perms::new(1, PermKind::None),
            &q(),
        )
        .unwrap();
        s
    }

    #[test]
    fn store_write_creates_parents_with_empty_values() {
        let mut s = Store::new();
        let ev = s.write(0, "/a/b/c", b"v", &q()).unwrap();
        assert_eq!(&*ev.path, "/a/b/c");
        assert_eq!(s.get("/a/b/c").unwrap().value, b"v");
        assert_eq!(s.get("/a/b").unwrap().value, b"");
        assert_eq!(&*s.get("/a").unwrap().children[0], "b");
        s.check_invariants().unwrap();
    }

    #[test]
    fn store_rm_removes_subtree_and_unlists() {
        let mut s = Store::new();
        s.write(0, "/a/b/c", b"v", &q()).unwrap();
        s.write(0, "/a/x", b"v", &q()).unwrap();
        let ev = s.rm(0, "/a/b").unwrap().unwrap();
        assert!(ev.removed);
        assert!(s.get("/a/b/c").is_none());
        assert!(s.get("/a/b").is_none());
        assert_eq!(s.get("/a").unwrap().children.len(), 1);
        s.check_invariants().unwrap();
    }

    #[test]
    fn store_rm_missing_with_parent_is_ok_without_parent_enoent() {
        let mut s = Store::new();
        s.mkdir(0, "/a", &q()).unwrap();
        assert_eq!(s.rm(0, "/a/nope"), Ok(None));
        assert_eq!(s.rm(0, "/a/nope/deeper"), Err(XsError::NoEnt));
        assert_eq!(s.rm(0, "/"), Err(XsError::Inval));
    }

    #[test]
    fn store_guest_write_readonly_node_is_eacces() {
        let mut s = guest_tree();
        assert_eq!(
            s.write(1, "/local/domain/1/name", b"x", &q()),
            Err(XsError::Acces)
        );
        assert!(s.write(1, "/local/domain/1/data/x", b"1", &q()).is_ok());
        assert_eq!(s.get("/local/domain/1/data/x").unwrap().perms.owner(), 1);
    }

    #[test]
    fn store_guest_read_unreadable_is_eacces_not_enoent() {
        let mut s = guest_tree();
        s.write(0, "/secret/x", b"1", &q()).unwrap();
        assert_eq!(s.readable(1, "/secret/x").unwrap_err(), XsError::Acces);
        assert_eq!(
            s.readable(1, "/secret/nothing").unwrap_err(),
            XsError::Acces
        );
        assert_eq!(
            s.readable(1, "/local/domain/1/nothing").unwrap_err(),
            XsError::NoEnt
        );
    }

    #[test]
    fn store_guest_node_quota_is_enospc() {
        let mut s = guest_tree();
        let quotas = Quotas {
            max_nodes: 3,
            ..Quotas::default()
        };
        // data itself is owned by domain 1: 1 node.
        s.write(1, "/local/domain/1/data/a", b"", &quotas).unwrap();
        s.write(1, "/local/domain/1/data/b", b"", &quotas).unwrap();
        assert_eq!(
            s.write(1, "/local/domain/1/data/c", b"", &quotas),
            Err(XsError::NoSpc)
        );
        s.rm(1, "/local/domain/1/data/a").unwrap();
        assert!(s.write(1, "/local/domain/1/data/c", b"", &quotas).is_ok());
        s.check_invariants().unwrap();
    }

    #[test]
    fn store_guest_value_and_children_quota_is_enospc() {
        let mut s = guest_tree();
        let quotas = Quotas {
            max_value: 4,
            max_children: 2,
            ..Quotas::default()
        };
        assert_eq!(
            s.write(1, "/local/domain/1/data/v", b"12345", &quotas),
            Err(XsError::NoSpc)
        );
        s.write(1, "/local/domain/1/data/a", b"1234", &quotas)
            .unwrap();
        s.write(1, "/local/domain/1/data/b", b"", &quotas).unwrap();
        assert_eq!(
            s.write(1, "/local/domain/1/data/c", b"", &quotas),
            Err(XsError::NoSpc)
        );
        // dom0 is not limited.
        assert!(s
            .write(0, "/local/domain/1/data/c", b"12345", &quotas)
            .is_ok());
    }

    #[test]
    fn store_guest_set_perms_other_owner_is_eacces() {
        let mut s = guest_tree();
        let give_away = Perms::new(2, PermKind::None);
        assert_eq!(
            s.set_perms(1, "/local/domain/1/data", give_away, &q()),
            Err(XsError::Acces)
        );
        let share = Perms::new(1, PermKind::None).with(2, PermKind::Read);
        assert!(s.set_perms(1, "/local/domain/1/data", share, &q()).is_ok());
        assert_eq!(
            s.set_perms(1, "/local/domain/1", Perms::new(1, PermKind::Both), &q()),
            Err(XsError::Acces)
        );
    }

    #[test]
    fn store_commit_conflicting_write_is_eagain() {
        let mut live = Store::new();
        live.write(0, "/a", b"1", &q()).unwrap();
        let mut tx = live.snapshot();
        tx.readable(0, "/a").unwrap();
        tx.write(0, "/b", b"2", &q()).unwrap();
        live.write(0, "/a", b"changed", &q()).unwrap();
        assert_eq!(live.commit(tx, 0, &q()), Err(XsError::Again));
        assert!(live.get("/b").is_none());
    }

    #[test]
    fn store_commit_unrelated_write_succeeds() {
        let mut live = Store::new();
        live.write(0, "/a/x", b"1", &q()).unwrap();
        live.write(0, "/b", b"1", &q()).unwrap();
        let mut tx = live.snapshot();
        tx.write(0, "/a/x", b"2", &q()).unwrap();
        live.write(0, "/b", b"3", &q()).unwrap();
        live.commit(tx, 0, &q()).unwrap();
        assert_eq!(live.get("/a/x").unwrap().value, b"2");
        assert_eq!(live.get("/b").unwrap().value, b"3");
        live.check_invariants().unwrap();
    }

    #[test]
    fn store_commit_concurrent_creation_of_read_absent_node_is_eagain() {
        let mut live = Store::new();
        let mut tx = live.snapshot();
        assert!(tx.readable(0, "/n").is_err());
        live.write(0, "/n", b"", &q()).unwrap();
        assert_eq!(live.commit(tx, 0, &q()), Err(XsError::Again));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(String, Vec<u8>),
        Mkdir(String),
        Rm(String),
    }

    fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let path = prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..4)
            .prop_map(|v| format!("/{}", v.join("/")));
        prop_oneof![
            (path.clone(), prop::collection::vec(any::<u8>(), 0..4))
                .prop_map(|(p, v)| Op::Write(p, v)),
            path.clone().prop_map(Op::Mkdir),
            path.prop_map(Op::Rm),
        ]
    }

    /// Applies `op` to a plain map of path -> value (the reference model).
    fn model_apply(m: &mut std::collections::BTreeMap<String, Vec<u8>>, op: &Op) {
        let ancestors = |p: &str| {
            let mut v = Vec::new();
            let mut cur = p;
            while let Some(par) = parent(cur) {
                v.push(par.to_string());
                cur = par;
            }
            v
        };
        match op {
            Op::Write(p, v) => {
                for a in ancestors(p) {
                    m.entry(a).or_default();
                }
                m.insert(p.clone(), v.clone());
            }
            Op::Mkdir(p) => {
                for a in ancestors(p) {
                    m.entry(a).or_default();
                }
                m.entry(p.clone()).or_default();
            }
            Op::Rm(p) => m.retain(|k, _| !super::super::path::is_child(k, p)),
        }
    }

    fn store_apply(s: &mut Store, op: &Op) {
        let _ = match op {
            Op::Write(p, v) => s.write(0, p, v, &q()).map(|_| ()),
            Op::Mkdir(p) => s.mkdir(0, p, &q()).map(|_| ()),
            Op::Rm(p) => s.rm(0, p).map(|_| ()),
        };
    }

    fn contents(s: &Store) -> std::collections::BTreeMap<String, Vec<u8>> {
        s.paths_below("/")
            .into_iter()
            .map(|p| {
                let v = s.get(&p).unwrap().value.clone();
                (p, v)
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn prop_store_matches_model(ops in proptest::collection::vec(op_strategy(), 0..40)) {
            let mut s = Store::new();
            let mut m = std::collections::BTreeMap::new();
            m.insert("/".to_string(), Vec::new());
            for op in &ops {
                store_apply(&mut s, op);
                model_apply(&mut m, op);
                proptest::prop_assert_eq!(contents(&s), m.clone());
                proptest::prop_assert!(s.check_invariants().is_ok());
            }
        }

        #[test]
        fn prop_store_uncontended_commit_equals_direct_apply(
            before in proptest::collection::vec(op_strategy(), 0..15),
            inside in proptest::collection::vec(op_strategy(), 0..15),
        ) {
            let mut live = Store::new();
            for op in &before {
                store_apply(&mut live, op);
            }
            let mut direct = live.clone();
            let mut tx = live.snapshot();
            for op in &inside {
                store_apply(&mut tx, op);
                store_apply(&mut direct, op);
            }
            proptest::prop_assert!(live.commit(tx, 0, &q()).is_ok());
            proptest::prop_assert_eq!(contents(&live), contents(&direct));
            proptest::prop_assert!(live.check_invariants().is_ok());
        }
    }

    #[test]
    fn store_commit_rm_applies_subtree_removal() {
        let mut live = Store::new();
        live.write(0, "/a/b/c", b"1", &q()).unwrap();
        let mut tx = live.snapshot();
        tx.rm(0, "/a/b").unwrap();
        live.commit(tx, 0, &q()).unwrap();
        assert_eq!(live.paths_below("/a"), vec!["/a".to_string()]);
        live.check_invariants().unwrap();
    }
}
