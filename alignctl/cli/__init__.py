"""The commands: train, eval, pipeline, plan, runs, report, export. Imports that need torch stay inside functions here."""
