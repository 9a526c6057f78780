//! The scheduling controllers: assignment, lease, reclaim (and tinytask sync). No framework code.
