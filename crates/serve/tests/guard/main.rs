//! Block servers facing hostile peers, in process on loopback with tiny random models:
//! no relay to non-servers or other models, authentication, caps, frame deadlines, hop
//! call deadlines, and the connection pool.
mod auth;
mod caps;
mod deadline;
mod pool;
mod relay;
mod support;
