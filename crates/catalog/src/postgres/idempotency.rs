//! Idempotency keys on PostgreSQL: the claim is an `INSERT ... ON CONFLICT
//! DO NOTHING` on the `(owner, idem_key)` primary key. Of two concurrent
//! claims (from any processes) the second insert waits for the first's
//! transaction, then does nothing; it reads the row in a new statement,
//! which sees the committed claim.

use sqlx::Row;
use time::OffsetDateTime;

use super::{secs, ts, PgCatalog};
use crate::idempotency::owner_text;
use crate::{IdempotencyClaim, IdempotentRequest, Result, StoredResponse, TokenOwner};

impl PgCatalog {
    pub(super) async fn claim_key(
        &self,
        req: &IdempotentRequest,
        now: OffsetDateTime,
        expired_before: OffsetDateTime,
    ) -> Result<IdempotencyClaim> {
        let owner = owner_text(req.owner);
        let mut tx = self.begin().await?;
        // Expiry rides on claims: one indexed delete, usually of nothing.
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
            .bind(secs(expired_before))
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (owner, idem_key, request_hash, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (owner, idem_key) DO NOTHING",
        )
        .bind(&owner)
        .bind(&req.key)
        .bind(&req.fingerprint[..])
        .bind(secs(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let claim = if inserted == 1 {
            IdempotencyClaim::Claimed
        } else {
            let row = sqlx::query(
                "SELECT request_hash, status, body, created_at FROM idempotency_keys \
                 WHERE owner = $1 AND idem_key = $2",
            )
            .bind(&owner)
            .bind(&req.key)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                // The claim that held it was released between our insert
                // and this read: the key is free, so try again from scratch.
                None => {
                    tx.rollback().await?;
                    return Box::pin(self.claim_key(req, now, expired_before)).await;
                }
                Some(row) => {
                    let hash: Vec<u8> = row.try_get("request_hash")?;
                    let status: Option<i64> = row.try_get("status")?;
                    let body: Option<Vec<u8>> = row.try_get("body")?;
                    match status {
                        _ if hash[..] != req.fingerprint[..] => IdempotencyClaim::Mismatch,
                        Some(status) => IdempotencyClaim::Completed(StoredResponse {
                            status: status as u16,
                            body: body.unwrap_or_default(),
                        }),
                        None => IdempotencyClaim::InProgress {
                            started_at: ts(row.try_get("created_at")?),
                        },
                    }
                }
            }
        };
        tx.commit().await?;
        Ok(claim)
    }

    pub(super) async fn complete_key(
        &self,
        owner: TokenOwner,
        key: &str,
        response: &StoredResponse,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE idempotency_keys SET status = $1, body = $2 \
             WHERE owner = $3 AND idem_key = $4 AND status IS NULL",
        )
        .bind(response.status as i64)
        .bind(&response.body)
        .bind(owner_text(owner))
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn release_key(&self, owner: TokenOwner, key: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE owner = $1 AND idem_key = $2 AND status IS NULL",
        )
        .bind(owner_text(owner))
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
