//! Catalog lost (issue 8, part 3): backups taken through the API of a real
//! `serve`, then `catalog.db` deleted. The provider re-adds the account and
//! one of the two servers under the same ids, runs `vpsbackup catalog
//! import-store` (twice: the second run changes nothing), and the API lists
//! the backup with its type, description and size again; a restore of it
//! through the API is byte-identical. The other server's backup is
//! reported and skipped, and keeps its id in the store.

use std::path::Path;

mod common;
use common::{add_server, ext4_image, ok, same, vpsbackup, wait_for, Serve};

fn token(dir: &Path) -> String {
    ok(dir, &["token", "create", "--account", "acme"])
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn a_lost_catalog_is_rebuilt_from_the_store_and_its_backups_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = t.join("data");
    ok(&dir, &["account", "create", "acme"]);
    let tok = token(&dir);
    let (disk5, disk6) = (t.join("vps5.img"), t.join("vps6.img"));
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    ext4_image(&disk5, "data.bin", &data);
    ext4_image(&disk6, "other.bin", &data[..1 << 20]);
    let original = t.join("original5.img");
    std::fs::copy(&disk5, &original).unwrap();
    add_server(&dir, "5", &disk5, &[]);
    add_server(&dir, "6", &disk6, &[]);

    let serve = Serve::start(&dir, &tok);
    let mut ids = Vec::new();
    for (server, body) in [
        ("5", r#"{"description": "before the upgrade"}"#),
        ("6", "{}"),
    ] {
        let (code, b) = serve.call(
            "POST",
            &format!("/servers/{server}/backup/"),
            &tok,
            Some(body),
        );
        assert_eq!(code, 201, "{b}");
        let id = b["id"].as_i64().unwrap();
        wait_for("the backup", || {
            serve.get(&format!("/backups/{id}/"), &tok)["status"] == "completed"
        });
        ids.push(id);
    }
    // The scheduler's catch-up takes an automatic backup of each server too.
    wait_for("every backup", || {
        let l = serve.get("/backups/", &tok);
        l["count"] == 4
            && l["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|b| b["status"] == "completed")
    });
    let before = serve.get("/backups/?server_id=5", &tok);
    let other: Vec<i64> = serve.get("/backups/?server_id=6", &tok)["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_i64().unwrap())
        .collect();
    assert_eq!(before["count"], 2, "{before}");
    drop(serve);

    // The catalog is lost; the store is not.
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    ok(&dir, &["account", "create", "acme"]);
    let tok = token(&dir);
    add_server(&dir, "5", &disk5, &[]);

    let first = ok(&dir, &["catalog", "import-store"]);
    assert!(
        first.contains(&format!("Imported backup {} of server 5", ids[0])),
        "{first}"
    );
    for id in &other {
        assert!(
            first.contains(&format!("Skipped b{id}: no server with id 6")),
            "{first}"
        );
    }
    assert!(first.contains("Imported 2 backups"), "{first}");
    let second = ok(&dir, &["catalog", "import-store"]);
    assert!(
        second.contains("Imported 0 backups; 2 were in the catalog already; 2 skipped"),
        "{second}"
    );

    let serve = Serve::start(&dir, &tok);
    // Both of server 5's backups, as they were (the automatic one with its
    // expiry; its day's slot taken, so no second automatic backup today).
    std::thread::sleep(std::time::Duration::from_secs(2));
    let list = serve.get("/backups/", &tok);
    assert_eq!(list["count"], 2, "{list}");
    for (after, before) in list["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(before["results"].as_array().unwrap())
    {
        for field in [
            "id",
            "backup_type",
            "status",
            "description",
            "size_mb",
            "created_at",
            "expires_at",
        ] {
            assert_eq!(after[field], before[field], "{field}: {after} vs {before}");
        }
        assert_eq!(after["server"]["id"], 5);
    }

    // The guest changes its disk; the imported backup restores it exactly.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk5)
            .unwrap();
        f.write_all_at(&[0x5a; 1 << 20], 1 << 20).unwrap();
    }
    let body = format!("{{\"backup_id\": {}}}", ids[0]);
    let (code, r) = serve.call("POST", "/servers/5/restore/", &tok, Some(&body));
    assert_eq!(code, 202, "{r}");
    let rid = r["id"].as_i64().unwrap();
    wait_for("the restore", || {
        let r = serve.get(&format!("/restores/{rid}/"), &tok);
        assert_ne!(r["status"], "failed", "{r}");
        r["status"] == "completed"
    });
    assert!(same(&disk5, &original), "the restored disk differs");

    // A new backup takes an id above every one the store holds, so the
    // skipped backup of server 6 is not overwritten.
    let (code, b) = serve.call("POST", "/servers/5/backup/", &tok, Some("{}"));
    assert_eq!(code, 201, "{b}");
    assert!(
        b["id"].as_i64().unwrap() > *other.iter().max().unwrap(),
        "{b}"
    );
    let id = b["id"].as_i64().unwrap();
    wait_for("the new backup", || {
        serve.get(&format!("/backups/{id}/"), &tok)["status"] == "completed"
    });
    drop(serve);
    let out = vpsbackup(&dir, &["store", "ls", dir.join("store").to_str().unwrap()]);
    let ls = String::from_utf8_lossy(&out.stdout);
    for id in &other {
        assert!(ls.contains(&format!("b{id}")), "{ls}");
    }
}
