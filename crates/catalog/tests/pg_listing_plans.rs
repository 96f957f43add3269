//! PostgreSQL's backup listings run on generic plans (planned once per
//! connection, from statistics rather than the values asked for). These
//! tests put the catalog in the shape that misleads such plans, one big
//! account whose one server holds nearly every backup of one type, and check
//! that every filter shape still reads only the rows it returns: the plan
//! walks the index that starts with the narrowest filter, never sorts, and
//! finds the servers' names through their primary key.

use vpsbackup_catalog::*;

mod common;
use common::{insert_backups_sql, new_server, now, PgDatabase};

/// Backups the big account's busy server gets.
const BIG: i64 = 3000;

/// Account "big" (server 1 with `BIG` automatic backups, server 2 with one
/// manual backup) and account "small" (server 3 with one manual backup), the
/// statistics taken: account, server and type each nearly one value.
async fn skewed() -> (PgDatabase, PgCatalog) {
    let db = PgDatabase::create().await;
    let cat = PgCatalog::open_with_connections(&db.url, 2).await.unwrap();
    let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
    let big = cat.create_account("big", now()).await.unwrap();
    let small = cat.create_account("small", now()).await.unwrap();
    for (id, account) in [(1, big.id), (2, big.id), (3, small.id)] {
        cat.add_server(new_server(id, account, plan.id), now())
            .await
            .unwrap();
    }
    let insert =
        |server, account, kind, count| insert_backups_sql(server, account, kind, count, "'seeded'");
    for sql in [
        insert(2, big.id.0, "manual", 1),
        insert(1, big.id.0, "automatic", BIG),
        insert(3, small.id.0, "manual", 1),
        "ANALYZE backups".to_string(),
    ] {
        cat.execute_raw(&sql).await.unwrap();
    }
    (db, cat)
}

/// The rows a plan's scans of `backups` read past the index: those
/// returned plus those its filters removed.
fn backup_rows_read(plan: &str) -> u64 {
    let mut read = 0;
    let mut in_backups = false;
    for line in plan.lines() {
        let line = line.trim_start_matches([' ', '-', '>']);
        if line.contains(" Scan") {
            in_backups = line.contains(" on backups ");
            if in_backups {
                let rows = line.split("rows=").nth(1).unwrap();
                read += rows
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        } else if in_backups && line.starts_with("Rows Removed by") {
            read += line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
        }
    }
    read
}

#[tokio::test]
async fn every_listing_shape_reads_only_what_it_returns() {
    let (_db, cat) = skewed().await;
    let big = cat.account_by_name("big").await.unwrap().unwrap().id;
    let small = cat.account_by_name("small").await.unwrap().unwrap().id;
    let page = PageRequest {
        number: 1,
        size: 50,
    };
    let manual = Some(BackupType::Manual);
    let automatic = Some(BackupType::Automatic);
    // (filter, rows it returns): the rare values of each column, and one
    // common one to show the page stops at its size.
    let shapes = [
        (Some(small), None, None, 1),
        (Some(small), None, manual, 1),
        (Some(small), Some(3), None, 1),
        (Some(small), Some(3), manual, 1),
        (Some(big), None, manual, 1),
        (Some(big), Some(2), None, 1),
        (Some(big), Some(1), manual, 0),
        (Some(big), Some(2), automatic, 0),
        (Some(big), None, None, 50),
        (None, None, manual, 2),
        (None, Some(3), None, 1),
        (None, Some(2), automatic, 0),
        (None, None, None, 50),
    ];
    for (scope, server, backup_type, returned) in shapes {
        let filter = BackupFilter {
            scope,
            server_id: server.map(ServerId),
            backup_type,
        };
        let plan = cat.explain_listing(&filter, page).await.unwrap();
        let listed = cat.list_backups(filter.clone(), page).await.unwrap();
        assert_eq!(listed.items.len(), returned, "{filter:?}");
        assert!(!plan.contains("Sort"), "{filter:?} sorts:\n{plan}");
        // (The admin's unfiltered count sums every account's counts rows.)
        for table in ["backups", "servers"] {
            let scan = format!("Seq Scan on {table} ");
            assert!(!plan.contains(&scan), "{filter:?} scans {table}:\n{plan}");
        }
        // One row past the page at most: a LIMIT stops its scan after it.
        let read = backup_rows_read(&plan);
        assert!(
            read <= returned as u64 + 1,
            "{filter:?} read {read} rows of backups for {returned}:\n{plan}"
        );
    }
}

#[test]
fn rows_read_counts_returned_and_filtered_rows_of_backups_only() {
    let plan = "Limit (actual time=0.1..0.2 rows=0 loops=1)
  ->  Index Scan Backward using backups_by_account_id on backups b (actual time=1..2 rows=2 loops=1)
        Index Cond: ((account_id >= 1) AND (account_id <= 1))
        Filter: (backup_type = 'manual'::text)
        Rows Removed by Filter: 3000
  SubPlan 1
    ->  Index Scan using servers_pkey on servers s (actual time=0.1..0.1 rows=1 loops=2)
          Rows Removed by Filter: 7";
    assert_eq!(backup_rows_read(plan), 3002);
}
