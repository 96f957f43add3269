//! The HTTP service: VPS.org Backups API, auth, job runner, scheduler (issues 3, 4).
