mod sim;
mod smoke {}
