//! The semantic cache: answers stored under the embedding of their prompt, looked up by cosine
//! similarity within a partition (the tenant and everything else that changes the answer), so a
//! paraphrase of an earlier prompt is answered without calling the backend. [`store`] keeps the
//! entries, in this instance's memory or shared by every instance through Redis.

pub mod store;
