#include "gateway/cli.hpp"

int main(int argc, char** argv) { return tollgate::gateway::run_cli(argc, argv); }
