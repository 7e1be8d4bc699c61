//! `opta-scripted-lmx`: the scripted inference server as a process, for the demo script.
//! It echoes each user message word by word.

use std::time::Duration;

use clap::Parser;
use opta_test_support::ScriptedLmx;

#[derive(Parser)]
#[command(about = "Scripted OpenAI-compatible inference server (echoes the user)")]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Pause before each streamed word, in milliseconds.
    #[arg(long, default_value_t = 40)]
    chunk_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lmx = ScriptedLmx::start_on(args.port).await?;
    lmx.set_echo_delay(Duration::from_millis(args.chunk_delay_ms));
    // The demo script reads this line to learn the port.
    println!("{}", lmx.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
