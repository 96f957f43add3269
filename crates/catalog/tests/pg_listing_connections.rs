//! The listings' own connections on PostgreSQL (src/postgres/session_pool.rs),
//! handed out and taken back without pings: a listing cancelled at any point
//! gives its connection's slot back and leaves the next listing whole, and a
//! connection the server ended while it was idle costs no listing an error.

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use vpsbackup_catalog::*;

mod common;
use common::{insert_backups_sql, new_server, now, PgDatabase};

/// Backups of the one server.
const BACKUPS: i64 = 2000;

/// A catalog whose listings have `listing_connections` connections, with
/// account "acme" and its server 1 holding `BACKUPS` backups.
async fn seeded(listing_connections: u32) -> (PgDatabase, PgCatalog, AccountId) {
    let db = PgDatabase::create().await;
    let cat = PgCatalog::open_with_pools(&db.url, 2, listing_connections)
        .await
        .unwrap();
    let plan = cat.plan_by_name("standard").await.unwrap().unwrap();
    let acme = cat.create_account("acme", now()).await.unwrap();
    cat.add_server(new_server(1, acme.id, plan.id), now())
        .await
        .unwrap();
    let rows = insert_backups_sql(1, acme.id.0, "automatic", BACKUPS, "repeat('x', 4000)");
    cat.execute_raw(&rows).await.unwrap();
    (db, cat, acme.id)
}

fn all_of(account: AccountId) -> BackupFilter {
    BackupFilter {
        scope: Some(account),
        ..Default::default()
    }
}

const BIG_PAGE: PageRequest = PageRequest {
    number: 1,
    size: 500,
};

/// The listing every check expects: the count, and the page's ids newest first.
async fn check_listing(cat: &PgCatalog, account: AccountId, expected: &[i64]) {
    let page = cat.list_backups(all_of(account), BIG_PAGE).await.unwrap();
    assert_eq!(page.count, BACKUPS as u64);
    let ids: Vec<i64> = page.items.iter().map(|b| b.id.0).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn a_listing_cancelled_at_any_point_leaves_nothing_for_the_next() {
    // One connection, so every listing after a cancelled one gets its
    // connection (or a new one, if the lease was dropped as it should be).
    let (_db, cat, acme) = seeded(1).await;
    let first = cat.list_backups(all_of(acme), BIG_PAGE).await.unwrap();
    let expected: Vec<i64> = first.items.iter().map(|b| b.id.0).collect();
    assert_eq!(expected.len(), 500);
    let mut cancelled = 0;
    for attempt in 0..40 {
        // Dropped after that many wakeups: from before the statement is
        // sent to the middle of its rows (it takes 2 to 10 here).
        let wakeups = attempt % 10;
        let mut listing = Box::pin(cat.list_backups(all_of(acme), BIG_PAGE));
        let mut polls = 0;
        let finished = std::future::poll_fn(|cx| {
            polls += 1;
            match listing.as_mut().poll(cx) {
                Poll::Ready(_) => Poll::Ready(true),
                Poll::Pending if polls > wakeups => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        drop(listing);
        if !finished {
            cancelled += 1;
        }
        check_listing(&cat, acme, &expected).await;
    }
    assert!(cancelled > 10, "only {cancelled} listings were cancelled");
}

#[tokio::test]
async fn connections_ended_by_the_server_cost_no_listing_an_error() {
    // One connection, so the next listing gets the one the server ended.
    let (_db, cat, acme) = seeded(1).await;
    let expected: Vec<i64> = cat
        .list_backups(all_of(acme), BIG_PAGE)
        .await
        .unwrap()
        .items
        .iter()
        .map(|b| b.id.0)
        .collect();
    for round in 0..3 {
        // What a restart does to the idle connection: its session ends
        // (57P01) and its socket closes, while the pool still holds it.
        let ended = cat
            .execute_raw(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = '{}'",
                LISTING_APPLICATION
            ))
            .await
            .unwrap();
        assert_eq!(ended, 1, "round {round}: sessions ended");
        // At once (no ping: used within the last second), and after the
        // pings start.
        if round == 1 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        check_listing(&cat, acme, &expected).await;
        check_listing(&cat, acme, &expected).await;
    }
}
