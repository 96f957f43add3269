//! A process's cache of token lookups on PostgreSQL (src/postgres/tokens.rs):
//! a change made by another process, through the catalog or in plain SQL,
//! is seen by the next lookup, and a lost listening connection empties the
//! cache rather than leave it trusted.

use std::time::Duration;

use vpsbackup_catalog::*;

mod common;
use common::{now, PgDatabase};

/// The process answering API requests and another one (the CLI) on one
/// database, with account "acme" and its token, whose hash this returns.
async fn two_processes() -> (PgDatabase, PgCatalog, PgCatalog, [u8; 32]) {
    let db = PgDatabase::create().await;
    let api = PgCatalog::open_with_connections(&db.url, 2).await.unwrap();
    let cli = PgCatalog::open_with_connections(&db.url, 2).await.unwrap();
    let account = cli.create_account("acme", now()).await.unwrap();
    let hash = [7; 32];
    cli.create_token(
        NewToken {
            hash,
            prefix: "vps_abcd".into(),
            name: "ci".into(),
            owner: TokenOwner::Account(account.id),
        },
        now(),
    )
    .await
    .unwrap();
    (db, api, cli, hash)
}

/// Looks the token up until the cache answers for it (its listener is up).
async fn cached(api: &PgCatalog, hash: &[u8; 32]) -> ApiToken {
    for _ in 0..500 {
        let token = api.token_by_hash(hash).await.unwrap().expect("the token");
        if api.cached_tokens() == 1 {
            return token;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the token never got into the cache");
}

/// The lookup once it stops answering `before`: a notification takes
/// milliseconds; the cache's own limit on an entry's age is 30 seconds.
async fn changed(api: &PgCatalog, hash: &[u8; 32], before: &Option<ApiToken>) -> Option<ApiToken> {
    for _ in 0..300 {
        let token = api.token_by_hash(hash).await.unwrap();
        if &token != before {
            return token;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the change was not seen within 3 seconds");
}

#[tokio::test]
async fn a_revocation_by_another_process_is_seen_at_once() {
    let (_db, api, cli, hash) = two_processes().await;
    let token = cached(&api, &hash).await;
    assert!(token.revoked_at.is_none());
    assert!(cli.revoke_token(TokenRef::Hash(hash), now()).await.unwrap());
    let seen = changed(&api, &hash, &Some(token)).await.unwrap();
    assert!(seen.revoked_at.is_some());
}

#[tokio::test]
async fn plain_sql_on_tokens_and_accounts_is_seen_too() {
    let (_db, api, cli, hash) = two_processes().await;
    let token = cached(&api, &hash).await;
    cli.execute_raw("UPDATE api_tokens SET name = 'renamed'")
        .await
        .unwrap();
    let renamed = changed(&api, &hash, &Some(token)).await.unwrap();
    assert_eq!(renamed.name, "renamed");
    cached(&api, &hash).await;
    // The account's deletion takes its tokens with it (ON DELETE CASCADE).
    cli.execute_raw("DELETE FROM accounts").await.unwrap();
    assert_eq!(changed(&api, &hash, &Some(renamed)).await, None);
}

#[tokio::test]
async fn a_lost_listener_empties_the_cache_and_it_listens_again() {
    let (_db, api, cli, hash) = two_processes().await;
    let token = cached(&api, &hash).await;
    let killed = cli
        .execute_raw(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'vpsbackup token cache' AND datname = current_database()",
        )
        .await
        .unwrap();
    assert_eq!(killed, 1, "one listening connection");
    // Emptied when the loss is noticed; filled again once it listens anew.
    for _ in 0..300 {
        if api.cached_tokens() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(api.cached_tokens(), 0);
    cached(&api, &hash).await;
    assert!(cli.revoke_token(TokenRef::Hash(hash), now()).await.unwrap());
    let seen = changed(&api, &hash, &Some(token)).await.unwrap();
    assert!(seen.revoked_at.is_some());
}
