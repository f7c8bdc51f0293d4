//! A domain snapshot record written as libvirt's `<domainsnapshot>`
//! (read back by [`super::parse_domainsnapshot`]).

use super::{DiskMode, DomSnapshot};
use crate::xmltree::esc;

/// `<domainsnapshot>` as libvirt writes it.
pub fn domainsnapshot_to_xml(s: &DomSnapshot, current: bool) -> String {
    let mut x = String::from("<domainsnapshot>\n");
    x.push_str(&format!("  <name>{}</name>\n", esc(&s.name)));
    if let Some(d) = &s.description {
        x.push_str(&format!("  <description>{}</description>\n", esc(d)));
    }
    x.push_str(&format!("  <state>{}</state>\n", s.state));
    if let Some(p) = &s.parent {
        x.push_str(&format!(
            "  <parent>\n    <name>{}</name>\n  </parent>\n",
            esc(p)
        ));
    }
    x.push_str(&format!(
        "  <creationTime>{}</creationTime>\n",
        s.creation_time
    ));
    match &s.memory_file {
        Some(f) => x.push_str(&format!(
            "  <memory snapshot='external' file='{}'/>\n",
            esc(&f.to_string_lossy())
        )),
        None => x.push_str(&format!(
            "  <memory snapshot='{}'/>\n",
            if s.memory_internal { "internal" } else { "no" }
        )),
    }
    x.push_str("  <disks>\n");
    for d in &s.disks {
        match (&d.mode, &d.overlay) {
            (DiskMode::External, Some(o)) => {
                x.push_str(&format!(
                    "    <disk name='{}' snapshot='external' type='file'>\n",
                    esc(&d.target)
                ));
                x.push_str("      <driver type='qcow2'/>\n");
                x.push_str(&format!(
                    "      <source file='{}'/>\n",
                    esc(&o.to_string_lossy())
                ));
                x.push_str("    </disk>\n");
            }
            (DiskMode::Reflink, _) => {
                // libvirt's 'manual' (made outside libvirt); the seed's
                // <volsnapshot> says how, and where the clone is.
                x.push_str(&format!(
                    "    <disk name='{}' snapshot='manual'>\n      <volsnapshot>\n        <kind>reflink</kind>\n        <file>{}</file>\n      </volsnapshot>\n    </disk>\n",
                    esc(&d.target),
                    esc(&d.state_file.to_string_lossy())
                ));
            }
            (mode, _) => x.push_str(&format!(
                "    <disk name='{}' snapshot='{}'/>\n",
                esc(&d.target),
                mode.as_str()
            )),
        }
    }
    x.push_str("  </disks>\n");
    x.push_str(&format!("  <active>{}</active>\n", u8::from(current)));
    for line in s.domain_xml.lines() {
        x.push_str("  ");
        x.push_str(line);
        x.push('\n');
    }
    x.push_str("</domainsnapshot>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domsnap::facts::default_clone;
    use crate::domsnap::{parse_domainsnapshot, DiskChoice, DiskMode, DomSnapDisk, DomSnapState};
    use std::path::Path;

    #[test]
    fn reflink_disks_round_trip_through_xml() {
        let snap = DomSnapshot {
            name: "r1".into(),
            domain: "d".into(),
            description: None,
            creation_time: 1,
            parent: None,
            seq: 0,
            state: DomSnapState::DiskSnapshot,
            memory_internal: false,
            quiesced: false,
            disks: vec![DomSnapDisk {
                target: "vdb".into(),
                mode: DiskMode::Reflink,
                state_file: "/vm/vdb.r1.raw".into(),
                overlay: None,
            }],
            domain_xml: String::new(),
            memory_file: None,
        };
        let x = domainsnapshot_to_xml(&snap, true);
        assert!(x.contains("<disk name='vdb' snapshot='manual'>"), "{x}");
        let r = parse_domainsnapshot(&x).unwrap();
        assert_eq!(
            r.disks,
            vec![(
                "vdb".to_string(),
                DiskChoice::Reflink(Some("/vm/vdb.r1.raw".into()))
            )]
        );
        assert_eq!(
            default_clone(Path::new("/vm/vdb.raw"), "s1"),
            Path::new("/vm/vdb.s1.raw")
        );
    }
}
