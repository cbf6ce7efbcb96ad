"""blockstore"""
