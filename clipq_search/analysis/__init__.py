"""Reading a run: Pareto analysis, the HTML report and text tables."""
