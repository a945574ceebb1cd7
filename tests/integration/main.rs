mod provider;
mod smoke {}
