mod ops;
mod smoke {}
