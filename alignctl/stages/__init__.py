"""Stage runners, one module each, ending with its STAGE declaration; alignctl/stages/registry.py lists them."""
