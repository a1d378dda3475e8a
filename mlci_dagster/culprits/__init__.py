"""From red to culprit (Dagster-free): deflake reruns that tell a flake from a break, and
bisection of a regression range to the commit that broke it."""
