// TEST-ONLY stand-in for Microsoft.Extensions.Options (IOptions<T> and Options.Create), enough
// to compile and run the Command 11+ registration of the forwarder under Mono.

namespace Microsoft.Extensions.Options
{
    /// <summary>Gives access to a configured options instance.</summary>
    public interface IOptions<out TOptions> where TOptions : class
    {
        TOptions Value { get; }
    }

    /// <summary>Helpers as in the real package.</summary>
    public static class Options
    {
        /// <summary>Wraps an instance, like the real Options.Create.</summary>
        public static IOptions<TOptions> Create<TOptions>(TOptions options) where TOptions : class
        {
            return new OptionsWrapper<TOptions>(options);
        }
    }

    /// <summary>An IOptions over a given instance.</summary>
    public class OptionsWrapper<TOptions> : IOptions<TOptions> where TOptions : class
    {
        public OptionsWrapper(TOptions options)
        {
            Value = options;
        }

        public TOptions Value { get; private set; }
    }
}
