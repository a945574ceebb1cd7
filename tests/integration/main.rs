mod plan;
mod smoke {}
