//! How the agent's tasks learn that it stops: one `watch` channel of
//! `bool`, turned true once, which every task selects on.
use tokio::sync::watch;

/// Completes once `stop` turns true (or its sender is gone). Returns no
/// borrow of the channel, so the futures awaiting it stay `Send`.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
