//! A stable, readable rendering of compiled map contents: what golden files hold and what
//! `simulate --explain`-style debugging prints.

use std::fmt::Write as _;

use netpol_common::identity;

use super::{compile::Compiled, model::Protocol};

fn peer(c: &Compiled, id: u32) -> String {
    match id {
        identity::ANY => "any".into(),
        identity::HOST => "host".into(),
        identity::WORLD => "world".into(),
        id if id >= identity::FIRST_CIDR_SET => {
            format!("cidr-set {}", id - identity::FIRST_CIDR_SET)
        }
        id => match c.identities.get(&id) {
            Some(k) => {
                let labels: Vec<String> =
                    k.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("#{id} {} {{{}}}", k.namespace, labels.join(","))
            }
            None => format!("identity {id}?"),
        },
    }
}

pub fn render(c: &Compiled) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# identities");
    for (id, k) in &c.identities {
        let named: Vec<String> = k
            .named_ports
            .iter()
            .map(|(n, p, port)| format!("{n}={port}/{p}"))
            .collect();
        let _ = writeln!(s, "{id} {} named[{}]", peer(c, *id), named.join(","));
    }
    let _ = writeln!(s, "# ipcache");
    for (net, id) in &c.ipcache {
        let _ = writeln!(s, "{net} -> {}", peer(c, *id));
    }
    let _ = writeln!(s, "# endpoints");
    for (pod, ep) in &c.endpoints {
        let side = |i: &super::compile::Isolation| {
            if i.isolated {
                format!("class {}", i.class)
            } else {
                "open".to_string()
            }
        };
        let _ = writeln!(
            s,
            "{pod} identity {} ingress {} egress {}",
            ep.identity,
            side(&ep.ingress),
            side(&ep.egress)
        );
    }
    let _ = writeln!(s, "# classes");
    for (id, class) in &c.classes {
        let policies: Vec<String> = class.policies.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "{id} {} {}", class.direction.name(), policies.join(","));
    }
    let _ = writeln!(s, "# cidr");
    for (e, set) in &c.cidr {
        let _ = writeln!(s, "class {} {} -> {}", e.class, e.net, peer(c, *set));
    }
    let _ = writeln!(s, "# policy");
    for (e, set) in &c.policy {
        let proto = match e.proto {
            None => "any".to_string(),
            Some(n) => Protocol::from_number(n).map_or(n.to_string(), |p| p.name().to_string()),
        };
        let port = match e.port {
            None => "any".to_string(),
            Some(p) if p.first() == p.last() => p.first().to_string(),
            Some(p) => format!("{}-{}", p.first(), p.last()),
        };
        let rules: Vec<String> = c.rule_sets[set].iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "class {} {} {proto}/{port} <- {}",
            e.class,
            peer(c, e.peer),
            rules.join(" ")
        );
    }
    s
}

#[cfg(test)]
mod golden {
    //! Golden tests: `tests/golden/<case>/input.yaml` compiled for node `n1` (node address
    //! 192.168.0.1) must render exactly as `expected.txt`. `UPDATE_GOLDEN=1` rewrites them.

    use std::{fs, path::Path};

    use super::render;
    use crate::{
        policy::{compile, model::Snapshot, Scope},
        source::file::add_documents,
    };

    #[test]
    fn golden_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let mut cases: Vec<_> = fs::read_dir(&root)
            .expect("golden dir")
            .map(|e| e.unwrap().path())
            .collect();
        cases.sort();
        assert!(cases.len() >= 3, "golden cases in {}", root.display());
        let update = std::env::var_os("UPDATE_GOLDEN").is_some();
        let mut failures = Vec::new();
        for case in cases {
            let input = fs::read_to_string(case.join("input.yaml")).expect("input.yaml");
            let mut snap = Snapshot::default();
            let mut errors = Vec::new();
            add_documents(&case.join("input.yaml"), &input, &mut snap, &mut errors);
            assert!(errors.is_empty(), "{}: {errors:?}", case.display());
            let got = render(&compile(
                &snap,
                &Scope::Node("n1".into()),
                &["192.168.0.1".parse().unwrap()],
            ));
            let path = case.join("expected.txt");
            if update {
                fs::write(&path, &got).unwrap();
                continue;
            }
            let want = fs::read_to_string(&path).unwrap_or_default();
            if got != want {
                failures.push(format!(
                    "{}:\n--- expected\n{want}\n--- got\n{got}",
                    case.display()
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "golden mismatch (UPDATE_GOLDEN=1 to accept):\n{}",
            failures.join("\n")
        );
    }
}
