//! Idempotency keys against both backends: claim, replay, mismatch,
//! release, owners apart, expiry, and concurrent claims of one key.

use time::{Duration, OffsetDateTime};
use vpsbackup_catalog::*;

#[macro_use]
mod common;
use common::now;

fn day_before(t: OffsetDateTime) -> OffsetDateTime {
    t - Duration::hours(24)
}

fn request(owner: TokenOwner, key: &str, fingerprint: u8) -> IdempotentRequest {
    IdempotentRequest {
        owner,
        key: key.into(),
        fingerprint: [fingerprint; 32],
    }
}

catalog_tests! {
    async fn a_key_is_claimed_once_then_replayed_or_refused(cat) {
        let alice = TokenOwner::Account(AccountId(1));
        let bob = TokenOwner::Account(AccountId(2));
        let first = request(alice, "k-1", 7);
        let claim = |r: IdempotentRequest| {
            let cat = cat.clone();
            async move {
                cat.claim_idempotency_key(&r, now(), day_before(now()))
                    .await
                    .unwrap()
            }
        };

        assert_eq!(claim(first.clone()).await, IdempotencyClaim::Claimed);
        assert_eq!(
            claim(first.clone()).await,
            IdempotencyClaim::InProgress { started_at: now() }
        );
        assert_eq!(
            claim(request(alice, "k-1", 8)).await,
            IdempotencyClaim::Mismatch
        );
        // Another owner's identical key is a different key.
        assert_eq!(
            claim(request(bob, "k-1", 7)).await,
            IdempotencyClaim::Claimed
        );
        assert_eq!(
            claim(request(TokenOwner::Admin, "k-1", 7)).await,
            IdempotencyClaim::Claimed
        );

        let answer = StoredResponse {
            status: 201,
            body: br#"{"id":5}"#.to_vec(),
        };
        cat.complete_idempotency_key(alice, "k-1", &answer)
            .await
            .unwrap();
        assert_eq!(
            claim(first.clone()).await,
            IdempotencyClaim::Completed(answer.clone())
        );
        assert_eq!(
            claim(request(alice, "k-1", 9)).await,
            IdempotencyClaim::Mismatch
        );
        // Release frees only a key still running, never a stored answer.
        cat.release_idempotency_key(alice, "k-1").await.unwrap();
        assert_eq!(
            claim(first.clone()).await,
            IdempotencyClaim::Completed(answer)
        );
        cat.release_idempotency_key(bob, "k-1").await.unwrap();
        assert_eq!(
            claim(request(bob, "k-1", 3)).await,
            IdempotencyClaim::Claimed
        );
    }

    async fn keys_expire_after_the_given_age(cat) {
        let owner = TokenOwner::Account(AccountId(1));
        let r = request(owner, "old", 1);
        let t0 = now();
        assert_eq!(
            cat.claim_idempotency_key(&r, t0, day_before(t0))
                .await
                .unwrap(),
            IdempotencyClaim::Claimed
        );
        let done = StoredResponse {
            status: 201,
            body: b"{}".to_vec(),
        };
        cat.complete_idempotency_key(owner, "old", &done)
            .await
            .unwrap();
        let later = t0 + Duration::hours(23);
        assert_eq!(
            cat.claim_idempotency_key(&r, later, day_before(later))
                .await
                .unwrap(),
            IdempotencyClaim::Completed(done)
        );
        // 24 h and a second on, the row is purged and the key free again,
        // even for a different request.
        let expired = t0 + Duration::hours(24) + Duration::seconds(1);
        let other = request(owner, "old", 2);
        assert_eq!(
            cat.claim_idempotency_key(&other, expired, day_before(expired))
                .await
                .unwrap(),
            IdempotencyClaim::Claimed
        );
    }

    async fn concurrent_claims_of_one_key_let_exactly_one_through(cat) {
        let owner = TokenOwner::Account(AccountId(1));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let cat = cat.clone();
            tasks.push(tokio::spawn(async move {
                cat.claim_idempotency_key(&request(owner, "same", 4), now(), day_before(now()))
                    .await
                    .unwrap()
            }));
        }
        let mut claimed = 0;
        for t in tasks {
            match t.await.unwrap() {
                IdempotencyClaim::Claimed => claimed += 1,
                other => assert_eq!(other, IdempotencyClaim::InProgress { started_at: now() }),
            }
        }
        assert_eq!(claimed, 1);
    }
}
