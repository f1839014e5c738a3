//! stub
use super::{Context, ControllerFuture};
pub(crate) fn start(_ctx: Context) -> ControllerFuture {
    Box::pin(async { Ok(()) })
}
