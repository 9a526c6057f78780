//! Client for the tinytask REST API (`/api/v1`).
