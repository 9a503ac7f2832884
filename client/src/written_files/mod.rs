//! Files the checkpointed tree holds open for writing (a log it appends to, a scratch
//! file): captured into the snapshot at checkpoint, put back before CRIU reopens them
//! at restore, so that a snapshot restores on any node, and again on the same node
//! after the file has grown.
//!
//! ```text
//! checkpoint: /proc/PID/fdinfo (flags O_WRONLY|O_RDWR) ─▶ [`find`] ─▶ at post-dump, tasks
//!   frozen: read through /proc/PID/fd/N ─▶ [`capture`] ─▶ chunker ─▶ layer "files"
//! restore:    layer "files" ─▶ [`put_back`] (before CRIU starts): absent → created,
//!   identical → kept, different → moved aside, then written
//! ```
//!
//! Format (proto/src/manifest.rs, "Written files"): each file the tree writes is an
//! `external_files` entry with `"written": true`, its size and mtime as stat'd while the
//! tasks were frozen (what CRIU recorded), and `left_out` when its content is not in
//! the snapshot. The content is a file of the `extra` layer named
//! [`WRITTEN_FILES_LAYER`](snapreg_proto::manifest::WRITTEN_FILES_LAYER), under the
//! absolute path less its leading `/`, with the mode CRIU checks on restore, chunked
//! and deduplicated like every other layer.
//!
//! When the files are listed: while the tasks are frozen (CRIU's post-dump, before
//! they are killed or resumed), streamed or spooled, so the list is what CRIU reopens:
//! a file a task opened a moment before the freeze is in it, and one it closed and
//! renamed then is not (listed before the dump, such a file made the restore refuse
//! it as missing). When they are read: streamed, at post-dump too, so each content is
//! exactly the size CRIU recorded in its image; spooled, after CRIU killed the tasks
//! (the same bytes: nothing of the tree ran since).
//! It is read through the process's own descriptor, so a file renamed since it was
//! opened (a rotated log) is still the file the process writes.
//!
//! Putting back (the invariants, enforced in [`put_back`]): nothing half-written is
//! ever visible under a file's name (a temporary file in the same directory, fsync'd,
//! then renamed over); a file in the way that differs is never overwritten silently
//! (hard-linked to `PATH.snapreg-moved-aside-<unix seconds>` first, then replaced, so
//! the name never disappears); a file that is already identical is left alone.
//!
//! Limits: a file over [`CaptureLimits::per_file`], or past [`CaptureLimits::total`]
//! for all of them, is left out, named in the checkpoint's report and the manifest; a
//! restore then refuses it as before if it differs. Files written through a shared
//! mapping only (no descriptor open for writing) are not looked for.

mod capture;
mod find;
mod put_back;

pub use capture::{capture, Capture, CaptureLimits, CaptureReport, CapturedFile, LeftOut};
pub use find::{written, WrittenFile};
pub use put_back::{left_to_check, put_back, put_back_layer, Action, PutBack, MOVED_ASIDE};
